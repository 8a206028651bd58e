"""The typed model output (``instalign.modeling.outputs``): the final block's prediction is the output's."""

from __future__ import annotations

import torch

from instalign.modeling.outputs import BlockPrediction, InstAlignOutput


def test_the_output_reads_its_final_block_and_has_no_aux_by_default():
    final = BlockPrediction(mask_logits=torch.zeros(1, 2, 4, 4), score_logits=torch.ones(1, 2),
                            phrase_loss=torch.zeros(1, 2), phrase_weights=torch.zeros(1, 2, 3))
    out = InstAlignOutput(final=final, merged_logits=torch.zeros(1, 4, 4), no_target_logits=torch.zeros(1),
                          text_mask=torch.ones(1, 3, dtype=torch.bool))
    assert out.mask_logits is final.mask_logits and out.score_logits is final.score_logits and out.aux == []
    assert InstAlignOutput(final=final, merged_logits=out.merged_logits, no_target_logits=out.no_target_logits,
                           text_mask=out.text_mask).aux is not out.aux  # not one shared list
