"""The InstAlign model (paper §3, Fig. 2): image + expression → instances, merged mask, no-target.

``InstAlign`` only wires injected submodules (built by ``builders.build_model``):

    images ──backbone──► C2..C5 ──pixel decoder──► V1..V3 (strides 32/16/8), V4 (stride 4)
    tokens ──text encoder──► T0 (B, L, C)
    learned queries, V1..V3, T0 ──K POT blocks──► per block: ŝ (eq. 4), p̂, POA (eqs. 1–3)
    block K: AIA (eq. 8) → merged logits; no-target head (eqs. 10–12) → p̂_nt logit

``forward`` returns the same ``InstAlignOutput`` in train and eval mode; losses live in
``instalign.losses`` and post-processing (thresholds, resizing) in the predictor. The hot
path has no Python loop over batch items, no host syncs (``.item()``) and no
data-dependent control flow, so it runs under ``torch.compile`` and bf16 autocast
(softmax, POA, aggregation and the no-target input are computed in fp32).

**Where the text enters** (Table 3 (e), the decoder rows): with ``decoder=pot`` the
queries meet the words inside every block (bidirectional object–text attention) and the
words are updated by the queries; with ``decoder=rela`` the queries read the words in every
block (ReLA's region–language attention) and the words stay T0. With ``decoder=mask2former``
the decoder sees no text at all — its queries and instance masks are the same for every
expression of an image — and the expression enters only after it: in the relevance score
(``PredictionHeads(text_score=True)``: query · sentence feature of T0), hence in AIA's
merged mask (eq. 8) and Q_global (eq. 10); in the no-target head's T_sen (eq. 11); and in
the phrase loss (eq. 3, POA of the text-free queries against T0).

Parameter names for optimiser groups: ``backbone.*`` (pretrained visual encoder),
``text_encoder.encoder.*`` (pretrained language model); everything else is new.

Letters: B batch, N queries, L tokens, C width, H×W the stride-4 grid of the S×S input.
"""

from __future__ import annotations

from torch import Tensor, nn

from instalign.modeling.backbone import Backbone
from instalign.modeling.heads import InstanceAggregation, NoTargetHead
from instalign.modeling.outputs import InstAlignOutput
from instalign.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from instalign.modeling.pot import PhraseObjectDecoder
from instalign.modeling.text_encoder import TextEncoder


class InstAlign(nn.Module):
    """Instance-aware generalized referring segmentation.

    Args:
        backbone: multi-scale visual encoder (strides 4, 8, 16, 32, NCHW).
        text_encoder: word features projected to C.
        pixel_decoder: deformable-attention pixel decoder → (V4, [V1, V2, V3]).
        decoder: the K POT blocks with the shared prediction heads.
        aggregator: AIA or a Table 3 alternative (eq. 8).
        no_target_head: p̂_nt (eqs. 10–12).
        image_size: the square input side S the model was built for.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        text_encoder: TextEncoder,
        pixel_decoder: MSDeformAttnPixelDecoder,
        decoder: PhraseObjectDecoder,
        aggregator: InstanceAggregation,
        no_target_head: NoTargetHead,
        image_size: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.aggregator = aggregator
        self.no_target_head = no_target_head
        self.image_size = image_size

    @property
    def num_queries(self) -> int:
        return int(self.decoder.query_feat.num_embeddings)

    @property
    def num_blocks(self) -> int:
        return len(self.decoder.blocks)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the backbone's and the pixel decoder's activations in the backward pass.

        Why: they hold most of the activation memory at 480² (stride-4 maps); recomputing
        them trades one more forward of those parts for it (``train.activation_checkpointing``). The
        backbone uses timm's own ``set_grad_checkpointing`` (a timm model without it is left
        as it is); the pixel decoder wraps each deformable layer in
        ``torch.utils.checkpoint``. Only while training with gradients; results unchanged.
        """
        body = getattr(self.backbone, "body", None)
        if hasattr(body, "set_grad_checkpointing"):
            body.set_grad_checkpointing(enabled)
        self.pixel_decoder.activation_checkpointing = bool(enabled)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> InstAlignOutput:
        """Predict instances, the merged mask and no-target for a batch of (image, expression) pairs.

        Args:
            images: (B, 3, S, S) normalised.
            input_ids: (B, L) token ids (right-padded).
            attention_mask: (B, L) 1 for real tokens.

        Returns:
            ``InstAlignOutput``: block K's prediction in ``final``, blocks 1..K-1 in ``aux``,
            merged logits (B, S/4, S/4), no-target logits (B,), the text mask (B, L) bool.
        """
        text_mask = attention_mask.bool()
        mask_features, multi_scale = self.pixel_decoder(self.backbone(images))  # V4, [V1, V2, V3]
        words = self.text_encoder(input_ids, attention_mask)  # T0 (B, L, C)
        preds, q_last, t_last = self.decoder(multi_scale, mask_features, words, text_mask)
        final = preds[-1]
        merged = self.aggregator(final.mask_logits, final.score_logits)  # eq. 8, pre-sigmoid
        no_target = self.no_target_head(q_last, final.score_logits, t_last, text_mask)  # eq. 12, pre-sigmoid
        return InstAlignOutput(final=final, merged_logits=merged, no_target_logits=no_target, text_mask=text_mask,
                               aux=preds[:-1])


__all__ = ["InstAlign"]
