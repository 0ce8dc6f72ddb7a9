"""A representative subset of the coverage sweep (lenses coverage): one or more MoE, hybrid,
state-space, stacked-stream and wrapped multimodal families, and every architecture-specific adapter
fix or refusal, each on a tiny random model built from the family's own config class."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def coverage():
    return __import__("lenses.jobs.coverage", fromlist=["main"])


EXPECTED = {
    # families
    "qwen3_moe": ("pass", ""),                # mixture of experts
    "deepseek_v3": ("pass", ""),              # MoE with multi-head latent attention
    "jamba": ("pass", ""),                    # attention + Mamba hybrid
    "qwen3_next": ("pass", ""),               # attention + gated delta-net hybrid
    "mamba": ("pass", "block outputs"),       # pure state space; its output_hidden_states are one layer later
    "rwkv": ("pass", "block outputs"),        # recurrent
    "gemma3": ("pass", ""),                   # a language model wrapped in a multimodal model
    "mllama": ("pass", ""),
    # architecture-specific fixes
    "nanochat": ("pass", ""),                 # the final norm module also runs on the embeddings
    "recurrent_gemma": ("pass", ""),          # logit soft-capping under the name logits_soft_cap
    "bert": ("pass", ""),                     # a head transform (dense, activation, norm) before the unembedding
    "gptj": ("pass", ""),                     # rotary dimension shrunk with the head size
    "longcat_flash": ("pass", ""),            # num_hidden_layers counts two sub-layers per block
    "inkling_text": ("pass", ""),             # muP output scaling (logits_mup_width_multiplier)
    "axk1": ("pass", ""),                     # group-limited MoE routing, groups shrunk with the experts
    "modernbert-decoder": ("pass", ""),       # final norm in the base model, then the head's own transform
    "megatron-bert": ("pass", ""),            # the same with the transform inside a head module
    "electra": ("pass", ""),                  # a head transform beside the base model, at the top level
    # configs the generic shrinking had to learn
    "falcon": ("pass", ""),                   # head_dim is a read-only property: left to follow the width
    "nemotron": ("pass", ""),                 # num_key_value_heads None by default: multi-head attention
    "dbrx": ("pass", ""),                     # sizes in attn_config/ffn_config sub-configs
    "lfm2_moe": ("pass", ""),                 # layer_types None by default; a dense first layer, then MoE
    "gemma4_text": ("pass", ""),              # per-layer head sizes (a heterogeneous config), scaled with the rest
    "dots3_note_text": ("pass", ""),          # per-layer heads and MLA ranks
    "zamba2": ("pass", ""),                   # two hybrid layers sharing one tied attention block
    "qwen4_exp_text": ("pass", ""),           # hyper-connections: 4 streams side by side, mixed at the end
    "deepseek_v4": ("pass", ""),              # hyper-connections: [batch, seq, 4, d], a mixing head, then the norm
    # refusals, with the adapter's reason
    "musicgen": ("refused", "4 output heads"),  # one head per audio codebook
    "gemma3n_text": ("refused", "stacked streams"),
    "dory": ("refused", "looped"),
    "hrm_text": ("refused", "several stacks of blocks"),
    "xlm": ("refused", "parallel lists"),
    "openai-gpt": ("refused", "no final norm"),
    "xlm-roberta": ("refused", "post-norm LM head"),
    "bart": ("refused", "encoder-decoder"),
}


@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_sweep_subset(coverage, model_type):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.set_num_threads(1)
    result, reason, _ = coverage.check(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    want, words = EXPECTED[model_type]
    assert result == want, reason
    assert words in reason, reason


def test_bidirectional_model_is_refused_with_the_fix(coverage):
    """A BERT-style causal-LM class built as an encoder (is_decoder=False) sees later tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lenses import ModelAdapter
    from lenses.base.errors import UnsupportedModelError

    config = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match="is_decoder = True"):
        ModelAdapter.from_model(model)
    config.is_decoder = True
    adapter = ModelAdapter.from_model(AutoModelForCausalLM.from_config(config).eval())
    assert adapter.final_norm_path == "cls.predictions.transform"  # the whole head transform, not its norm


def test_a_layer_between_the_last_block_and_the_norm_is_refused():
    """Something that transforms the last block's output before the final norm: the norm's input is not
    the residual stream, so the adapter refuses rather than reading it as hidden[L]."""
    from tiny_models import tiny_model

    from lenses import ModelAdapter
    from lenses.base.errors import UnsupportedModelError

    model = tiny_model("llama")
    norm = model.model.norm
    model.model.norm = torch.nn.Sequential(torch.nn.Linear(norm.weight.shape[0], norm.weight.shape[0]), norm)
    with pytest.raises(UnsupportedModelError, match="changes the last block's output"):
        ModelAdapter.from_model(model)


def test_modernbert_decoder_chains_its_norm_and_head():
    from transformers import AutoConfig, AutoModelForCausalLM

    from lenses import ModelAdapter
    from lenses.model.adapter import HeadChain

    config = AutoConfig.for_model("modernbert-decoder", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=64, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, sep_token_id=2, cls_token_id=1)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = ModelAdapter.from_model(model)  # verify(): decoding hidden[L] reproduces the logits
    assert isinstance(adapter.final_norm, HeadChain) and adapter.final_norm_path == "model.final_norm -> lm_head"
    assert adapter.norm_entry is model.model.final_norm


def test_per_layer_sizes_survive_shrinking(coverage):
    """Gemma 4's full-attention layers have twice the head size of its sliding ones (a per-layer config):
    the tiny model keeps one layer of each kind and the ratio, instead of one size for all."""
    config = coverage.tiny_config("gemma4_text")
    assert config.layer_types == ["sliding_attention", "full_attention"]
    heads = [config.per_layer_config[i].head_dim for i in range(2)]
    assert heads == [16, 32]


@pytest.mark.parametrize("model_type,want", [("llama", "yes: attention + MLP"), ("mamba", "yes: mixer only"),
                                             ("jamba", "yes: mixer + MLP"),  # 2 blocks kept: both Mamba
                                             ("bloom", "no: ")])
def test_the_sweep_says_which_types_split_into_residual_parts(coverage, model_type, want):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    result, _, parts = coverage.check(model_type, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    assert result == "pass" and parts.startswith(want), parts
