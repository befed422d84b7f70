"""Hugging Face export and import against transformers itself: logits, greedy generation,
tokenizer ids, determinism and refusals (l3train.checkpoint.huggingface).

Weights are random with a large spread (norm gains included) so that a swapped or
transposed tensor changes the logits far beyond the 1e-5 tolerance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # a test-time dependency (requirements.txt): exported folders must load in it
from safetensors.torch import load_file, save_file

from l3train.checkpoint.consolidated import (Consolidated, ConsolidatedContents, load_model, plain_state_dict,
                                             write_consolidated)
from l3train.checkpoint.huggingface import export_huggingface, import_huggingface, model_section_from_huggingface
from l3train.config import Config, config_from_dict
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.model.build import build_model
from training_harness import tiny_l3_config

TOLERANCE = 1e-5
NEW_TOKENS = 20


def make_config(tmp_path: Path, corpus, allocation: Path, *overrides: str, model: dict | None = None) -> Config:
    tree = tiny_l3_config(tmp_path / "run", corpus, allocation)
    if model is not None:
        tree["model"] = model
    return config_from_dict(tree, list(overrides))


def randomise(tensors: dict[str, torch.Tensor], seed: int) -> None:
    """Overwrite every float tensor: gains 1 ± 0.2 for vectors (norms), N(0, 0.1) for matrices."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors.values():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(1 + 0.2 * noise if tensor.dim() == 1 else 0.1 * noise)


def random_checkpoint(cfg: Config, directory: Path) -> tuple[Consolidated, torch.nn.Module]:
    """A consolidated checkpoint of the model `cfg` with random weights, and that model."""
    model, _ = build_model(cfg)
    randomise(model.state_dict(), seed=1)
    write_consolidated(directory, ConsolidatedContents(cfg, 3, {"test": "random weights"}),
                       plain_state_dict(model, cfg.model.tie_embeddings).items())
    return Consolidated(directory), model.eval()


def batch(corpus, length: int = 48) -> torch.Tensor:
    """Two real documents' first `length` token ids."""
    tokenizer = Tokenizer.load(corpus.tokenizer_path)
    long_documents = [ids for ids in map(tokenizer.encode, corpus.documents) if len(ids) >= length]
    return torch.tensor([long_documents[0][:length], long_documents[5][:length]])


def l3train_greedy(model: torch.nn.Module, prompt: torch.Tensor, eos_id: int) -> list[int]:
    """Greedy continuation by l3train's model, recomputing the whole prefix each step."""
    ids = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos_id:
                break
    return ids


def assert_same_model(model: torch.nn.Module, hf_model, corpus) -> None:
    """Equal logits on a real batch and the same greedy continuation of a prompt."""
    tokens = batch(corpus)
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = hf_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= TOLERANCE
    prompt = tokens[:1, :12]
    generated = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                  do_sample=False)
    assert generated[0].tolist() == l3train_greedy(model, prompt, Tokenizer.load(corpus.tokenizer_path).eod_id)


@pytest.mark.parametrize("tie", [False, True])
def test_dense_export_is_a_llama_with_the_same_logits_generation_and_tokenizer(tmp_path, tiny_corpus,
                                                                               tiny_allocation, tie):
    cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[]",
                      f"model.tie_embeddings={str(tie).lower()}", "model.norm_eps=1e-6", "model.rope_theta=5000")
    consolidated, model = random_checkpoint(cfg, tmp_path / "consolidated")
    folder = export_huggingface(consolidated, tmp_path / "hf")

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert (config["num_key_value_heads"], config["rms_norm_eps"], config["tie_word_embeddings"]) == (2, 1e-6, tie)
    assert not (folder / "modeling_l3train.py").exists()
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert hf_model.config.rope_parameters["rope_theta"] == 5000
    assert (hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()) == tie
    assert_same_model(model, hf_model, tiny_corpus)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer = Tokenizer.load(tiny_corpus.tokenizer_path)
    texts = [*tiny_corpus.documents, "  two  spaces, a tab\tand ﬁ ①\n\nnew lines 12345 😀", "literal </s> and <s>"]
    mismatched = [text for text in texts if hf_tokenizer.encode(text) != tokenizer.encode(text)]
    assert mismatched == []
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id) == (tokenizer.eod_id, config["bos_token_id"])


@pytest.mark.parametrize("l3", [["l3.tied_kv=true", "l3.norm=rms"],
                                ["l3.tied_kv=false", "l3.d_emb=32", "l3.norm=layer", "model.tie_embeddings=true"]],
                         ids=["tied-kv-rms", "untied-kv-layernorm"])
def test_l3_export_loads_as_remote_code_with_the_same_logits_and_generation(tmp_path, tiny_corpus, tiny_allocation,
                                                                            l3):
    cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[0, 1]", *l3)
    consolidated, model = random_checkpoint(cfg, tmp_path / "consolidated")
    folder = export_huggingface(consolidated, tmp_path / "hf_l3")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(hf_model).__name__ == "L3TrainForCausalLM"
    lookup = hf_model.model.lookups["1"].lookup
    assert torch.equal(lookup.bounds, model.lookups["1"].lookup.bounds)
    assert (lookup.value_table is None) == cfg.l3.tied_kv
    assert_same_model(model, hf_model, tiny_corpus)

    # The L³ layers matter: without their output the logits are far off.
    tokens = batch(tiny_corpus)
    with torch.no_grad():
        full = hf_model(input_ids=tokens).logits
        for block in hf_model.model.lookups.values():
            block.lookup.mix.weight.zero_()
        assert (hf_model(input_ids=tokens).logits - full).abs().max().item() > 0.1


def test_export_is_deterministic_and_refuses_existing_output_and_moe(tmp_path, tiny_corpus, tiny_allocation):
    cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.tied_kv=false", "l3.d_emb=32")
    consolidated, _ = random_checkpoint(cfg, tmp_path / "consolidated")
    first = export_huggingface(consolidated, tmp_path / "first")
    second = export_huggingface(consolidated, tmp_path / "second")
    files = sorted(path.name for path in first.iterdir())
    assert "model.safetensors" in files and files == sorted(path.name for path in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    with pytest.raises(L3TrainError, match="already exists"):
        export_huggingface(consolidated, first)
    export_huggingface(consolidated, first, overwrite=True)

    moe_cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[]", "moe.blocks=[1]")
    moe, _ = random_checkpoint(moe_cfg, tmp_path / "moe")
    with pytest.raises(L3TrainError, match=r"MoE blocks \(moe.blocks=\[1\]\).*not support"):
        export_huggingface(moe, tmp_path / "hf_moe")
    assert not (tmp_path / "hf_moe").exists()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A small GQA Llama written by transformers itself, with random weights."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=5000.0, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(config)
    randomise(dict(model.named_parameters()), seed=2)
    folder = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(folder)
    return folder


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(folder).eval()(input_ids=tokens).logits


def test_import_reproduces_the_llama_and_adds_l3_layers_that_start_silent(tmp_path, tiny_corpus, tiny_allocation,
                                                                          hf_llama):
    tokens = batch(tiny_corpus)
    expected = hf_logits(hf_llama, tokens)
    section = model_section_from_huggingface(hf_llama)
    assert section["n_kv_heads"] == 2 and section["rope_theta"] == 5000.0 and section["norm_eps"] == 1e-6

    dense_cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[]", model=section)
    dense = Consolidated(import_huggingface(hf_llama, dense_cfg, tmp_path / "dense"))
    assert dense.step == 0
    assert dense.manifest["source"] == {"huggingface": str(hf_llama.resolve()), "architecture": "LlamaForCausalLM"}
    with torch.no_grad():
        assert (load_model(dense)(tokens).logits - expected).abs().max().item() <= TOLERANCE
    sharded = tmp_path / "sharded"
    transformers.LlamaForCausalLM.from_pretrained(hf_llama).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    from_shards = Consolidated(import_huggingface(sharded, dense_cfg, tmp_path / "dense_from_shards")).state_dict()
    assert all(torch.equal(tensor, from_shards[name]) for name, tensor in dense.state_dict().items())

    l3_cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[0]", model=section)
    imported = Consolidated(import_huggingface(hf_llama, l3_cfg, tmp_path / "with_l3"))
    model = load_model(imported)
    output = model(tokens)
    assert (output.logits - expected).abs().max().item() <= TOLERANCE
    state = imported.state_dict()
    assert not state["lookups.0.lookup.mix.weight"].any()
    for name in ("lookups.0.lookup.rows.key_table", "lookups.0.lookup.up.weight"):
        assert 0.015 < state[name].std() < 0.025, name  # the normal initialisation, init_std 0.02
    assert torch.equal(state["blocks.1.attention.wk.weight"], load_file(hf_llama / "model.safetensors")[
        "model.layers.1.self_attn.k_proj.weight"])
    # Silent but not stuck: the loss reaches W_mix at step 0.
    torch.nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert model.lookups["0"].lookup.mix.weight.grad.abs().max() > 0


def broken_copy(hf_llama: Path, tmp_path: Path, config_changes: dict | None = None,
                drop_tensor: str | None = None) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(hf_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if drop_tensor:
        tensors = load_file(folder / "model.safetensors")
        del tensors[drop_tensor]
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


BAD_INPUTS = [
    ("no config", r"broken/config.json not found; pass a Hugging Face model folder"),
    ("mistral", r"architecture MistralForCausalLM \(model_type mistral\) is not supported"),
    ("attention bias", r"attention_bias=True is not supported"),
    ("scaled rope", r"rope_parameters=.*linear.* is not supported; l3train has plain RoPE"),
    ("mismatched size", r"model.d_model=32 does not match hidden_size=64 in .*config.json; set model.d_model: 64"),
    ("missing tensor", r"broken lacks model.layers.1.mlp.up_proj.weight \(1 missing, 0 unknown\)"),
    ("other tokenizer", r"data.tokenizer=.* differs from the model's own .*broken/tokenizer.model"),
]


@pytest.mark.parametrize("problem, message", BAD_INPUTS, ids=[problem for problem, _ in BAD_INPUTS])
def test_import_refuses_bad_inputs_in_one_line_without_output(tmp_path, tiny_corpus, tiny_allocation, hf_llama,
                                                              problem, message):
    changes = {"mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
               "attention bias": {"attention_bias": True},
               "scaled rope": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}}
    folder = broken_copy(hf_llama, tmp_path, changes.get(problem),
                         "model.layers.1.mlp.up_proj.weight" if problem == "missing tensor" else None)
    if problem == "no config":
        (folder / "config.json").unlink()
    if problem == "other tokenizer":
        (folder / "tokenizer.model").write_bytes(tiny_corpus.tokenizer_path.read_bytes() + b"\0")
    section = model_section_from_huggingface(hf_llama)
    if problem == "mismatched size":
        section = {**section, "d_model": 32}
    cfg = make_config(tmp_path, tiny_corpus, tiny_allocation, "l3.after_blocks=[]", model=section)
    output = tmp_path / "imported"
    with pytest.raises(L3TrainError, match=message) as error:
        import_huggingface(folder, cfg, output)
    assert "\n" not in str(error.value)
    assert not output.exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".staging")]


@pytest.mark.slow
@pytest.mark.parametrize("l3_blocks", ["[]", "[0]"], ids=["dense", "l3"])
def test_export_of_a_trained_run_through_the_cli(l3_blocks, tmp_path, tiny_corpus, shared_runs):
    """A real training checkpoint exported by `tools/convert_checkpoint.py export` (consolidated on
    the way) loads in transformers with the trained model's logits and greedy continuation."""
    import subprocess
    import sys

    from training_harness import REPO, trainer_env

    run_dir = shared_runs.get("tiny_dense" if l3_blocks == "[]" else "tiny_l3").run_dir
    for command in (["consolidate", run_dir, "--output", tmp_path / "plain"],
                    ["export", run_dir, "--output", tmp_path / "hf"]):
        result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, command)], cwd=REPO,
                                env=trainer_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    model = load_model(Consolidated(tmp_path / "plain"))
    if l3_blocks == "[]":
        hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    else:
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert_same_model(model, hf_model.eval(), tiny_corpus)
