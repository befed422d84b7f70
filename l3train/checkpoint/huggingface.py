"""Hugging Face export and import of l3train models.

l3train's backbone is a Llama: pre-norm blocks with RMSNorm, rotate-half RoPE on the two
halves of each head (as transformers' Llama, so no q/k permutation), grouped-query attention
with kv head j serving query heads j·g … j·g+g-1 (g = n_heads / n_kv_heads, as
`repeat_kv`), SwiGLU feed-forwards, no biases. Tensors keep their values; only names change:

    l3train (consolidated)              Hugging Face
    embedding.weight                    model.embed_tokens.weight
    blocks.{i}.attention_norm.weight    model.layers.{i}.input_layernorm.weight
    blocks.{i}.attention.w{q,k,v,o}     model.layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.ffn_norm.weight          model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.feed_forward.w1          model.layers.{i}.mlp.gate_proj
    blocks.{i}.feed_forward.w3          model.layers.{i}.mlp.up_proj
    blocks.{i}.feed_forward.w2          model.layers.{i}.mlp.down_proj
    norm.weight                         model.norm.weight
    output.weight                       lm_head.weight (absent when the embeddings are tied)

A dense model exports as a plain `LlamaForCausalLM` folder. A model with L³ layers exports
as an `L3TrainForCausalLM` folder with remote code (the files of `hf_l3_model/`, copied in;
load with `trust_remote_code=True`); its L³ tensors move under `model.` and lose the row
backend's `rows.` level:

    lookups.{b}.norm.weight              model.lookups.{b}.norm.weight   (the pre-norm)
    lookups.{b}.lookup.bounds            model.lookups.{b}.lookup.bounds (int64, rows of token t:
                                                                          bounds[t]:bounds[t+1])
    lookups.{b}.lookup.rows.key_table    model.lookups.{b}.lookup.key_table
    lookups.{b}.lookup.rows.value_table  model.lookups.{b}.lookup.value_table (untied K/V only)
    lookups.{b}.lookup.{up,norm,mix}.*   model.lookups.{b}.lookup.{up,norm,mix}.*

MoE blocks have no counterpart in either architecture and are refused. Both directions write
their output atomically and refuse an existing one unless asked to overwrite; an export is
deterministic (the same checkpoint gives byte-identical files).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import sentencepiece as spm
import torch
from torch import Tensor

from l3train.checkpoint.consolidated import (Consolidated, ConsolidatedContents, write_safetensors,
                                             plain_state_dict, write_consolidated)
from l3train.config import Config
from l3train.errors import L3TrainError
from l3train.model.build import build_model, load_allocation
from l3train.utils.atomic import atomic_directory
from l3train.utils.outputs import refuse_existing

HF_ARCHITECTURE = "LlamaForCausalLM"
L3_ARCHITECTURE = "L3TrainForCausalLM"
REMOTE_CODE_DIR = Path(__file__).with_name("hf_l3_model")
REMOTE_CODE_FILES = ("configuration_l3train.py", "modeling_l3train.py")
# Weight files of at most 5 GB (transformers 4's default shard size): easy to upload and
# download one at a time, and few enough even for large models.
MAX_SHARD_BYTES = 5 * 10**9

# (l3train name, Hugging Face name); "{}" stands for a block index.
_BACKBONE_NAMES = (
    ("embedding.weight", "model.embed_tokens.weight"),
    ("blocks.{}.attention_norm.weight", "model.layers.{}.input_layernorm.weight"),
    ("blocks.{}.attention.wq.weight", "model.layers.{}.self_attn.q_proj.weight"),
    ("blocks.{}.attention.wk.weight", "model.layers.{}.self_attn.k_proj.weight"),
    ("blocks.{}.attention.wv.weight", "model.layers.{}.self_attn.v_proj.weight"),
    ("blocks.{}.attention.wo.weight", "model.layers.{}.self_attn.o_proj.weight"),
    ("blocks.{}.ffn_norm.weight", "model.layers.{}.post_attention_layernorm.weight"),
    ("blocks.{}.feed_forward.w1.weight", "model.layers.{}.mlp.gate_proj.weight"),
    ("blocks.{}.feed_forward.w3.weight", "model.layers.{}.mlp.up_proj.weight"),
    ("blocks.{}.feed_forward.w2.weight", "model.layers.{}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)
_L3_NAMES = (
    ("lookups.{}.norm.weight", "model.lookups.{}.norm.weight"),
    ("lookups.{}.lookup.bounds", "model.lookups.{}.lookup.bounds"),
    ("lookups.{}.lookup.rows.key_table", "model.lookups.{}.lookup.key_table"),
    ("lookups.{}.lookup.rows.value_table", "model.lookups.{}.lookup.value_table"),
    ("lookups.{}.lookup.up.weight", "model.lookups.{}.lookup.up.weight"),
    ("lookups.{}.lookup.norm.weight", "model.lookups.{}.lookup.norm.weight"),
    ("lookups.{}.lookup.norm.bias", "model.lookups.{}.lookup.norm.bias"),
    ("lookups.{}.lookup.mix.weight", "model.lookups.{}.lookup.mix.weight"),
)
# Old transformers versions saved the rotary inverse frequencies; they are recomputed from rope_theta.
_IGNORED_HF_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def huggingface_name(name: str) -> str:
    """The Hugging Face name of the l3train tensor `name` (see the table above)."""
    for ours, theirs in (*_BACKBONE_NAMES, *_L3_NAMES):
        match = re.fullmatch(r"(\d+)".join(map(re.escape, ours.split("{}"))), name)
        if match:
            return theirs.format(*match.groups())
    raise L3TrainError(f"tensor {name} has no Hugging Face counterpart (MoE experts and routers are not exported)")


# ---------------------------------------------------------------------------------------------
# Export


def _special_token_ids(tokenizer_path: str) -> dict[str, int | None]:
    """bos/eos/pad ids of the sentencepiece model (None where it has no such piece)."""
    processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = {"bos_token_id": processor.bos_id(), "eos_token_id": processor.eos_id(), "pad_token_id": processor.pad_id()}
    return {key: value if value >= 0 else None for key, value in ids.items()}


def _llama_config(cfg: Config, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of the backbone as transformers' LlamaConfig reads it."""
    m = cfg.model
    return {
        "architectures": [HF_ARCHITECTURE], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.d_model // m.n_heads, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        # transformers 5 reads rope_parameters; older readers (transformers 4, vLLM, llama.cpp) rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rope_theta": m.rope_theta,
        "dtype": "float32", "torch_dtype": "float32", "use_cache": True, **token_ids,
    }


def _l3_config(cfg: Config, token_ids: dict[str, int | None]) -> dict[str, Any]:
    """config.json of an L³ model: the Llama fields plus the `l3_*` fields of L3TrainConfig."""
    allocation = load_allocation(cfg)
    return {
        **_llama_config(cfg, token_ids),
        "architectures": [L3_ARCHITECTURE], "model_type": "l3train",
        "auto_map": {"AutoConfig": "configuration_l3train.L3TrainConfig",
                     "AutoModelForCausalLM": "modeling_l3train.L3TrainForCausalLM"},
        "l3_after_blocks": sorted(cfg.l3.after_blocks), "l3_num_rows": int(allocation.rows_per_token.sum()),
        "l3_d_emb": cfg.l3.d_emb, "l3_d_up": cfg.l3.d_up, "l3_tied_kv": cfg.l3.tied_kv, "l3_norm": cfg.l3.norm,
    }


def _write_json(path: Path, tree: dict[str, Any]) -> None:
    # Sorted keys: part of what makes two exports of one checkpoint byte-identical.
    path.write_text(json.dumps(tree, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(folder: Path, tokenizer_path: str, max_seq_len: int) -> None:
    """tokenizer.model, plus tokenizer.json and tokenizer_config.json with which
    `AutoTokenizer.from_pretrained(folder)` gives the ids l3train's tokenizer gives.

    tokenizer.json is transformers' conversion of the sentencepiece model following the
    model's own normalizer spec (NFKC table, whitespace handling, byte fallback). Two
    settings match l3train's use of it: no BOS/EOS added to encoded text (l3train appends
    EOD between documents itself) and `split_special_tokens`, so a literal "</s>" in text is
    text, as for sentencepiece."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise L3TrainError("exporting to Hugging Face needs the transformers package: pip install transformers") from None
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    processor = spm.SentencePieceProcessor(model_file=tokenizer_path)
    pieces = {f"{kind}_token": processor.id_to_piece(index)
              for kind, index in (("bos", processor.bos_id()), ("eos", processor.eos_id()),
                                  ("unk", processor.unk_id()), ("pad", processor.pad_id())) if index >= 0}
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **pieces, "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len})
    # Converted while the folder holds only the tokenizer files (no config.json to inspect).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))


def _exported_tensors(consolidated: Consolidated) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors under their Hugging Face names, read one file at a time."""
    for name, tensor in consolidated.tensors():
        yield huggingface_name(name), tensor


def export_huggingface(consolidated: Consolidated, output: Path, overwrite: bool = False) -> Path:
    """Write `consolidated` as a Hugging Face model folder at `output` and return it.

    A dense model becomes a standard Llama folder (`LlamaForCausalLM`, no remote code), so
    every tool that reads Llama checkpoints reads it. A model with L³ layers becomes an
    `L3TrainForCausalLM` folder carrying its modeling code (`trust_remote_code=True`),
    because no transformers architecture has lookup layers. Weights stay fp32 as trained.
    Both include the tokenizer (see `_write_tokenizer`) and a generation config with the
    tokenizer's bos/eos ids."""
    output = Path(output)
    refuse_existing([output], "a Hugging Face model folder", overwrite)
    cfg = consolidated.config
    if cfg.moe.blocks:
        raise L3TrainError(f"{consolidated.directory} has MoE blocks (moe.blocks={cfg.moe.blocks}), which the "
                           f"Hugging Face export does not support; only dense and L³ models export")
    token_ids = _special_token_ids(cfg.data.tokenizer)
    config = _l3_config(cfg, token_ids) if cfg.l3.after_blocks else _llama_config(cfg, token_ids)
    with atomic_directory(output) as staging:
        _write_tokenizer(staging, cfg.data.tokenizer, cfg.model.max_seq_len)
        write_safetensors(staging, "model", _exported_tensors(consolidated), MAX_SHARD_BYTES)
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json",
                    {key: value for key, value in token_ids.items() if value is not None})
        if cfg.l3.after_blocks:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(REMOTE_CODE_DIR / name, staging / name)
    return output


# ---------------------------------------------------------------------------------------------
# Import


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise L3TrainError(f"{path} not found; pass a Hugging Face model folder ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise L3TrainError(f"{path} is not valid JSON: {err}") from None


def _rope_theta(hf: dict[str, Any], where: Path) -> float:
    """RoPE base of a Llama config; scaled or otherwise modified RoPE is refused (l3train has plain RoPE)."""
    parameters = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        raise L3TrainError(f"{where}: rope_scaling={hf['rope_scaling']} is not supported; l3train has plain RoPE")
    if parameters.get("rope_type", "default") != "default" or parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise L3TrainError(f"{where}: rope_parameters={parameters} is not supported; l3train has plain RoPE "
                           f"(rope_type default over whole heads)")
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _read_llama_config(hf_folder: Path) -> dict[str, Any]:
    """The Hugging Face config.json of `hf_folder`, checked to describe a model l3train can hold."""
    where = hf_folder / "config.json"
    hf = _read_json(where, "config.json and model.safetensors")
    architectures = hf.get("architectures") or [HF_ARCHITECTURE]
    if architectures != [HF_ARCHITECTURE] or hf.get("model_type", "llama") != "llama":
        raise L3TrainError(f"{where}: architecture {', '.join(architectures)} (model_type "
                           f"{hf.get('model_type')}) is not supported; import reads {HF_ARCHITECTURE} models")
    absent = [key for key in _REQUIRED_HF_KEYS if not isinstance(hf.get(key), int)]
    if absent:
        raise L3TrainError(f"{where} lacks {absent[0]} (a Llama config has {', '.join(_REQUIRED_HF_KEYS)})")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    for field, supported in unsupported.items():
        if hf.get(field, supported) != supported:
            raise L3TrainError(f"{where}: {field}={hf[field]!r} is not supported; l3train's Llama has "
                               f"{field}={supported!r}")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim", head_dim) not in (None, head_dim):
        raise L3TrainError(f"{where}: head_dim={hf['head_dim']} is not supported; l3train's heads have "
                           f"hidden_size / num_attention_heads = {head_dim} features")
    _rope_theta(hf, where)
    return hf


def model_section_from_huggingface(hf_folder: Path) -> dict[str, Any]:
    """The l3train `model:` config section of the Hugging Face Llama in `hf_folder`, for users
    writing the config they will train the imported model with."""
    hf_folder = Path(hf_folder)
    hf = _read_llama_config(hf_folder)
    return {
        "vocab_size": hf["vocab_size"], "d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"],
        "n_heads": hf["num_attention_heads"],
        "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": _rope_theta(hf, hf_folder / "config.json"), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_embeddings": hf.get("tie_word_embeddings", False), "init_std": hf.get("initializer_range", 0.02),
    }


# The model keys that must equal the Hugging Face model's; max_seq_len and init_std may differ
# (RoPE needs no table of fixed length, and init_std only initialises added layers).
_MUST_MATCH = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
               "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
               "ffn_hidden_size": "intermediate_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
               "tie_embeddings": "tie_word_embeddings"}


def _check_model_section(cfg: Config, hf_folder: Path) -> None:
    expected = model_section_from_huggingface(hf_folder)
    for key, hf_key in _MUST_MATCH.items():
        ours = getattr(cfg.model, key)
        if ours != expected[key]:
            raise L3TrainError(f"model.{key}={ours} does not match {hf_key}={expected[key]} in {hf_folder}/config.json; "
                               f"set model.{key}: {expected[key]} (the matching model section: "
                               f"{json.dumps(expected)})")
    if cfg.moe.blocks:
        raise L3TrainError(f"moe.blocks={cfg.moe.blocks}: a Hugging Face Llama has no experts to import into MoE "
                           f"blocks; import into a dense model (moe.blocks: [])")
    # An embedding is only meaningful with the tokenizer it was trained with. (A missing
    # data.tokenizer is reported by build_model like everywhere else.)
    hf_tokenizer, ours = hf_folder / "tokenizer.model", Path(cfg.data.tokenizer)
    if hf_tokenizer.is_file() and ours.is_file() and hf_tokenizer.read_bytes() != ours.read_bytes():
        raise L3TrainError(f"data.tokenizer={cfg.data.tokenizer} differs from the model's own {hf_tokenizer}; "
                           f"train with the tokenizer the model was trained with (set data.tokenizer: {hf_tokenizer})")


def _safetensors_files(hf_folder: Path) -> list[Path]:
    """The weight files of `hf_folder`: a sharded index's files, or model.safetensors."""
    index = hf_folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map", {})
        return [hf_folder / name for name in sorted(set(weight_map.values()))]
    single = hf_folder / "model.safetensors"
    if not single.is_file():
        raise L3TrainError(f"{hf_folder} has no model.safetensors (nor model.safetensors.index.json); import reads "
                           f"safetensors weights only (convert .bin files with transformers' save_pretrained)")
    return [single]


def _hf_tensor_names(files: list[Path]) -> dict[str, Path]:
    """The file of each tensor, from the safetensors headers alone (no tensor is read)."""
    from safetensors import safe_open

    names = {}
    for path in files:
        if not path.is_file():
            raise L3TrainError(f"{path} is missing (listed in model.safetensors.index.json)")
        with safe_open(str(path), framework="pt") as handle:
            names.update({name: path for name in handle.keys() if not _IGNORED_HF_TENSOR.fullmatch(name)})
    return names


def _copy_hf_weights(state: dict[str, Tensor], hf_folder: Path, tie_embeddings: bool) -> None:
    """Copy every backbone tensor of `state` from the Hugging Face weights, one file at a
    time; a missing, unknown or misshapen tensor is one clear line."""
    from safetensors import safe_open

    hf_names = _hf_tensor_names(_safetensors_files(hf_folder))
    # transformers ignores a stored lm_head of a tied model (it ties it to the embedding); so do we.
    if tie_embeddings:
        hf_names.pop("lm_head.weight", None)
    wanted = {huggingface_name(name): name for name in state if not name.startswith("lookups.")}
    missing = sorted(set(wanted) - set(hf_names))
    unknown = sorted(set(hf_names) - set(wanted))
    if missing or unknown:
        what = f"lacks {missing[0]}" if missing else f"has a tensor l3train's Llama lacks: {unknown[0]}"
        raise L3TrainError(f"{hf_folder} {what} ({len(missing)} missing, {len(unknown)} unknown)")
    for path in sorted(set(hf_names.values())):
        with safe_open(str(path), framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name not in wanted:
                    continue
                target, value = state[wanted[hf_name]], handle.get_tensor(hf_name)
                if value.shape != target.shape:
                    raise L3TrainError(f"{path}: {hf_name} has shape {tuple(value.shape)}, l3train expects "
                                       f"{tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(value)


def import_huggingface(hf_folder: Path, cfg: Config, output: Path, overwrite: bool = False) -> Path:
    """Write the Hugging Face Llama in `hf_folder` as a consolidated checkpoint of the model
    `cfg` describes (step 0), at `output`; return it.

    `cfg.model` must describe the same backbone (see `model_section_from_huggingface`); every
    backbone tensor comes from the Hugging Face weights. L³ layers that `cfg.l3` adds keep the
    model's normal initialisation (seeded by `training.seed`), except each layer's output
    projection W_mix, which is zero. The L³ output W_mix[…] then is exactly zero, so the
    imported model computes the pretrained model's logits at step 0 instead of a perturbed
    version of them, yet training is not stuck: the gradient of W_mix is the outer product of
    the output gradient with [Norm(W_up a); x], which is not zero, so W_mix moves at the first
    step and the tables, W_up and the norms (whose gradients pass through W_mix) follow from
    the second."""
    hf_folder, output = Path(hf_folder), Path(output)
    refuse_existing([output], "a consolidated checkpoint", overwrite)
    _check_model_section(cfg, hf_folder)
    model, _ = build_model(cfg)
    state = plain_state_dict(model, cfg.model.tie_embeddings)
    _copy_hf_weights(state, hf_folder, cfg.model.tie_embeddings)
    with torch.no_grad():
        for layer in model.l3_layers():
            layer.mix.weight.zero_()
    source = {"huggingface": str(hf_folder.resolve()), "architecture": HF_ARCHITECTURE}
    return write_consolidated(output, ConsolidatedContents(cfg, 0, source), state.items(), overwrite=overwrite)
