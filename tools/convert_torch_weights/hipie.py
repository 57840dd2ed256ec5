"""Mapping table: HIPIE segmentor state dict (``r50_parts.pth`` / recipe) -> ``segllm_jax.models.hipie``.

Source keys are HIPIE_IMG's own state-dict names (``detr.detr.backbone.0.backbone...``); a SegLLM
checkpoint stores them under ``model.segmentator.hipie.`` — use ``HIPIE_TABLE.under(prefix, "")``.
Target paths are the NNX state paths of ``Hipie`` joined by "/" (architecture.md §A2, §A3):

* Conv2d OIHW -> HWIO ``kernel`` (``conv_kernel``); Linear (out, in) -> ``kernel`` (in, out).
* LayerNorm weight/bias -> ``scale``/``bias``; GroupNorm and FrozenBN keep PyTorch names.
* FrozenBN buffers are kept one-to-one (``norm/{weight,bias,running_mean,running_var}``).

The table has two halves with separate owners: ``_IMAGE_SIDE_RULES`` (backbone, input_proj,
level_embed, VL fusion, encoder) and ``_DECODER_SIDE_RULES`` (two-stage selection, decoder,
heads, mask branch).
"""

from __future__ import annotations

from segllm_jax_convert.engine import MappingTable, Rule, conv_kernel, linear_kernel

_BB = r"detr\.detr\.backbone\.0\.backbone\."
_TR = r"detr\.detr\.transformer\."
_VL = _TR + r"encoder\.vl_layers\.0\.b_attn\."
_BN = r"(?P<p>weight|bias|running_mean|running_var)"

# ------------------------------------------------------------------------------------------------
# Image side: backbone -> input_proj (+ level_embed) -> VL fusion -> deformable encoder.
# ------------------------------------------------------------------------------------------------
_IMAGE_SIDE_RULES: tuple[Rule, ...] = (
    # detectron2 ResNet-50 (§H3): convs without bias, each with a FrozenBN `norm`
    Rule(_BB + r"stem\.conv1\.weight", "backbone/stem/conv1/kernel", conv_kernel),
    Rule(_BB + r"stem\.conv1\.norm\." + _BN, "backbone/stem/conv1/norm/{p}"),
    Rule(_BB + r"(?P<stage>res[2-5])\.(?P<i>\d+)\.(?P<conv>conv[123]|shortcut)\.weight",
         "backbone/{stage}/{i}/{conv}/kernel", conv_kernel),
    Rule(_BB + r"(?P<stage>res[2-5])\.(?P<i>\d+)\.(?P<conv>conv[123]|shortcut)\.norm\." + _BN,
         "backbone/{stage}/{i}/{conv}/norm/{p}"),
    # input projections (§H5): `<i>.0` conv (with bias), `<i>.1` GroupNorm(32)
    Rule(r"detr\.detr\.input_proj\.(?P<i>\d+)\.0\.weight", "input_proj/{i}/conv/kernel", conv_kernel),
    Rule(r"detr\.detr\.input_proj\.(?P<i>\d+)\.0\.bias", "input_proj/{i}/conv/bias"),
    Rule(r"detr\.detr\.input_proj\.(?P<i>\d+)\.1\.(?P<p>weight|bias)", "input_proj/{i}/norm/{p}"),
    Rule(_TR + r"level_embed", "level_embed/embedding"),
    # VL fusion block (§H6): BiAttentionBlock, pre-norm, layer scales gamma_v / gamma_l
    Rule(_VL + r"gamma_(?P<s>[vl])", "fusion/gamma_{s}"),
    Rule(_VL + r"layer_norm_(?P<s>[vl])\.weight", "fusion/layer_norm_{s}/scale"),
    Rule(_VL + r"layer_norm_(?P<s>[vl])\.bias", "fusion/layer_norm_{s}/bias"),
    Rule(_VL + r"attn\.(?P<n>v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)\.weight",
         "fusion/attn/{n}/kernel", linear_kernel),
    Rule(_VL + r"attn\.(?P<n>v_proj|l_proj|values_v_proj|values_l_proj|out_v_proj|out_l_proj)\.bias",
         "fusion/attn/{n}/bias"),
    # deformable encoder layers (§H7)
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.self_attn\."
         r"(?P<n>sampling_offsets|attention_weights|value_proj|output_proj)\.weight",
         "encoder/layers/{i}/self_attn/{n}/kernel", linear_kernel),
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.self_attn\."
         r"(?P<n>sampling_offsets|attention_weights|value_proj|output_proj)\.bias",
         "encoder/layers/{i}/self_attn/{n}/bias"),
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.(?P<n>linear[12])\.weight", "encoder/layers/{i}/{n}/kernel",
         linear_kernel),
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.(?P<n>linear[12])\.bias", "encoder/layers/{i}/{n}/bias"),
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.(?P<n>norm[12])\.weight", "encoder/layers/{i}/{n}/scale"),
    Rule(_TR + r"encoder\.layers\.(?P<i>\d+)\.(?P<n>norm[12])\.bias", "encoder/layers/{i}/{n}/bias"),
)
# ------------------------------------------------------------------------------------------------
# end of the image side
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# Decoder side: two-stage selection -> decoder -> heads -> CondInst mask branch.
# ------------------------------------------------------------------------------------------------
import logging  # noqa: E402  (kept inside the decoder-side section)
import re  # noqa: E402

import numpy as np  # noqa: E402

from segllm_jax_convert.engine import Invertible, Transform  # noqa: E402

log = logging.getLogger(__name__)

_T = _TR
_D = r"detr\.detr\."
# the shared heads exist twice in the checkpoint (§O12): `detr.detr.X_embed.*` and
# `detr.detr.transformer.decoder.X_embed.*`; one rule per alias, both mapping to the same target (the
# engine checks they are equal), so that export writes both names back
_HEAD_ALIASES = (r"detr\.detr\.", r"detr\.detr\.transformer\.decoder\.")


def _linear_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return (Rule(src + r"\.weight", dst + "/kernel", linear_kernel), Rule(src + r"\.bias", dst + "/bias"))


def _norm_rules(src: str, dst: str) -> tuple[Rule, ...]:
    return (Rule(src + r"\.weight", dst + "/scale"), Rule(src + r"\.bias", dst + "/bias"))


def query_table_rows(num_queries: int) -> Transform:
    """§O1: ``tgt_embed.weight`` with more rows than the model's query count (r50_parts.pth: 900).

    SegLLM itself skips that tensor (shape mismatch) and trains a fresh (100, 256) table; a
    converted model needs *some* table, so the first ``num_queries`` rows are kept and the rule is
    logged loudly. SegLLM-finetuned checkpoints carry the learned 100-row table and pass through.
    Export writes the model's own table back unchanged (a SegLLM checkpoint's shape).
    """

    def rows(x: np.ndarray) -> np.ndarray:
        if x.ndim == 2 and x.shape[0] > num_queries:
            if x.dtype != np.bool_:  # the engine's zero-memory shape probe is bool: log only real loads
                log.warning("tgt_embed.weight has %d rows but the model uses %d queries (docs/architecture.md §O1; "
                            "r50_parts.pth was trained with 900): keeping rows 0..%d. SegLLM itself "
                            "re-initialises this table, so use a SegLLM-finetuned checkpoint for real "
                            "inference.", x.shape[0], num_queries, num_queries - 1)
            return x[:num_queries]
        return x

    return Invertible(rows, lambda x: x, f"query_table_rows({num_queries})")


def _decoder_side_rules(num_queries: int = 100) -> tuple[Rule, ...]:
    L = _T + r"decoder\.layers\.(?P<i>\d+)\."
    DL = "decoder/layers/{i}/"
    rules: list[Rule] = [
        # two-stage selection (§H8)
        *_linear_rules(_T + r"enc_output", "decoder/two_stage/enc_output"),
        *_norm_rules(_T + r"enc_output_norm", "decoder/two_stage/enc_output_norm"),
        Rule(_T + r"tgt_embed\.weight", "decoder/two_stage/tgt_embed/embedding", query_table_rows(num_queries)),
        Rule(_T + r"tgt_embed_bg\.weight", "decoder/two_stage/tgt_embed_bg/embedding"),
        Rule(_T + r"bg_query_refs\.weight", "decoder/two_stage/bg_query_refs/embedding"),
        # decoder layers (§H9); MHA stays packed: in_proj kernel [C, 3C], columns q|k|v
        Rule(L + r"self_attn\.in_proj_weight", DL + "self_attn/in_proj/kernel", linear_kernel),
        Rule(L + r"self_attn\.in_proj_bias", DL + "self_attn/in_proj/bias"),
        *_linear_rules(L + r"self_attn\.out_proj", DL + "self_attn/out_proj"),
        *_linear_rules(L + r"cross_attn\.(?P<p>sampling_offsets|attention_weights|value_proj|output_proj)",
                       DL + "cross_attn/{p}"),
        *_norm_rules(L + r"(?P<n>norm[123])", DL + "{n}"),
        *_linear_rules(L + r"(?P<f>linear[12])", DL + "{f}"),
        *_linear_rules(_T + r"decoder\.ref_point_head\.layers\.(?P<j>\d+)", "decoder/ref_point_head/layers/{j}"),
        # heads (§H10), each converted once from either alias (§O12)
        *(rule for heads in _HEAD_ALIASES for rule in (
            *_linear_rules(heads + r"class_embed\.(?P<i>\d+)\.dot_product_projection_text",
                           "class_embed/{i}/dot_product_projection_text"),
            Rule(heads + r"class_embed\.(?P<i>\d+)\.(?P<p>log_scale|bias_lang|bias0)", "class_embed/{i}/{p}"),
            *_linear_rules(heads + r"class_embed\.(?P<i>\d+)\.body", "class_embed/{i}/body"),
            *_linear_rules(heads + r"bbox_embed\.(?P<i>\d+)\.layers\.(?P<j>\d+)", "bbox_embed/{i}/layers/{j}"),
        )),
        *_linear_rules(_D + r"iou_head\.(?P<i>\d+)", "iou_head/{i}"),
        # CondInst mask branch (§H11 to §H13)
        *_linear_rules(r"detr\.controller\.layers\.(?P<j>\d+)", "controller/layers/{j}"),
        Rule(r"detr\.mask_head\.(?P<c>lay[1-4]|jia_dcn)\.weight", "mask_head/{c}/kernel", conv_kernel),
        Rule(r"detr\.mask_head\.(?P<c>lay[1-4]|jia_dcn)\.bias", "mask_head/{c}/bias"),
    ]
    return tuple(rules)


_DECODER_SIDE_RULES: tuple[Rule, ...] = _decoder_side_rules()

# ------------------------------------------------------------------------------------------------
# end of the decoder side
# ------------------------------------------------------------------------------------------------

_IGNORED: tuple[tuple[str, str], ...] = (
    (r"text_encoder\..*", "BERT text encoder: built and loaded, never called (SegLLM replaces forward_text)"),
    (r"criterion\._iter", "criterion iteration counter (training bookkeeping buffer)"),
    (r"detr\.mask_dino(_cls_embed)?\..*", "MaskDINO branch: not built in SegLLM (MASKDINO.ENABLED=False)"),
    # decoder side
    (_TR + r"resizer\..*", "transformer.resizer: runs, but its output is multiplied by 0 (STILL_TGT_FOR_BOTH)"),
    (r"detr\.resizer\..*", "detr.resizer: DN label encoder, training only (a SegLLM conversion keeps it in "
                          "training_params/: dn_resizer_table, segllm.dn_resizer_arrays)"),
)

HIPIE_TABLE = MappingTable("hipie", _IMAGE_SIDE_RULES + _DECODER_SIDE_RULES, ignore=_IGNORED)


def dn_resizer_table() -> MappingTable:
    """``detr.resizer.*`` -> ``segllm_jax.models.hipie.training.DNLabelEncoder`` paths (every other key ignored).

    The training-only half :data:`HIPIE_TABLE` leaves out; for a SegLLM checkpoint apply
    ``.under(SEGLLM_PREFIX, "")`` first (``segllm.dn_resizer_training_table`` does, for the trainer's paths).
    """
    r = r"detr\.resizer\."
    rules = (Rule(r + r"fc\.weight", "fc/kernel", linear_kernel), Rule(r + r"fc\.bias", "fc/bias"),
             Rule(r + r"layer_norm\.weight", "layer_norm/scale"), Rule(r + r"layer_norm\.bias", "layer_norm/bias"))
    return MappingTable("hipie_dn_resizer", rules,
                        ignore=((r"(?!detr\.resizer\.).*", "not the DN label encoder (main HIPIE table)"),))

# ------------------------------------------------------------------------------------------------
# Decoder side: choosing the table for a given checkpoint
# ------------------------------------------------------------------------------------------------
SEGLLM_PREFIX = "model.segmentator.hipie."


def hipie_table(num_queries: int = 100) -> MappingTable:
    """The table for a model with ``num_queries`` foreground queries (SegLLM: 100; §O1)."""
    if num_queries == 100:
        return HIPIE_TABLE
    return MappingTable("hipie", _IMAGE_SIDE_RULES + _decoder_side_rules(num_queries), ignore=_IGNORED)


def hipie_table_for(keys, num_queries: int = 100) -> MappingTable:
    """The table matching a checkpoint's key set, for a stand-alone ``Hipie``.

    * bare HIPIE_IMG keys (``r50_parts.pth``, the golden recipe): :data:`HIPIE_TABLE`;
    * a SegLLM checkpoint (keys under ``model.segmentator.hipie.``): the same table under that
      prefix; everything outside the sub-tree (LLM, vision tower, projectors) is ignored here
      because the SegLLM table converts it.
    """
    table = hipie_table(num_queries)
    if not any(str(k).startswith(SEGLLM_PREFIX) for k in keys):
        return table
    sub = table.under(SEGLLM_PREFIX, "")
    outside = ((r"(?!" + re.escape(SEGLLM_PREFIX) + r").*",
                "outside the HIPIE sub-tree of a SegLLM checkpoint (converted by the SegLLM table)"),)
    return MappingTable("hipie(segllm)", sub.rules, sub.ignore + outside)
