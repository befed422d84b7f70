"""Evaluation (l3train.eval): every figure checked against an independent or hand computation.

Models are real DecoderLMs (with L³ layers) on the real tiny tokenizer; references score each
token with its own forward pass of exactly the context it should see, in fp64."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from l3train.config import L3Config, ModelConfig
from l3train.data.tokenizer import Tokenizer
from l3train.errors import L3TrainError
from l3train.eval.data import EvalText, split_range, text_documents, token_stream
from l3train.eval.diagnostics import L3Diagnostics
from l3train.eval.logit_lens import LogitLens
from l3train.eval.multiple_choice import Example, continuation_task, evaluate_multiple_choice, load_task
from l3train.eval.perplexity import evaluate_lm
from l3train.model.llama import DecoderLM

REPO = Path(__file__).resolve().parents[2]


def small_model(vocab_size: int, seed: int = 0) -> DecoderLM:
    """A 2-block model with an L³ layer after block 0 (3 rows per token), randomly initialised."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64,
                      max_seq_len=64)
    model = DecoderLM(cfg, L3Config(after_blocks=[0], d_emb=32, d_up=64), np.full(vocab_size, 3), None)
    return model.eval()


def reference_nll(model: DecoderLM, stream: np.ndarray, seq_length: int) -> list[float]:
    """-log p of every token after the first: token j is predicted from stream[w·L : j] with
    w = (j-1) // L (its window), each with its own forward pass, in fp64."""
    losses = []
    with torch.no_grad():
        for j in range(1, len(stream)):
            context = torch.as_tensor(stream[(j - 1) // seq_length * seq_length:j])[None]
            logits = model(context).logits[0, -1].double()
            losses.append(-float(torch.log_softmax(logits, -1)[stream[j]]))
    return losses


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: their forward passes are dominated by thread synchronisation,
    which on a busy machine makes two threads many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_corpus) -> Tokenizer:
    return Tokenizer.load(tiny_corpus.tokenizer_path)


def test_perplexity_is_exp_of_the_independent_mean_token_loss(tiny_corpus, tokenizer):
    model = small_model(tokenizer.vocab_size)
    documents = [np.asarray([*tokenizer.encode(text), tokenizer.eod_id]) for text in tiny_corpus.documents[:3]]
    documents = [doc[:25] for doc in documents]  # short: the reference runs a forward pass per token
    text = EvalText(documents, "three documents")
    seq_length = 16  # several windows, the last one partial
    stream = token_stream(documents, tokenizer.eod_id)
    assert (len(stream) - 1) % seq_length != 0
    reference = reference_nll(model, stream, seq_length)
    result = evaluate_lm(model, text, tokenizer, seq_length, batch_size=2, progress=False)
    assert result.tokens == len(reference) == sum(len(doc) for doc in documents)
    assert result.perplexity == pytest.approx(math.exp(np.mean(reference)), rel=1e-5)
    assert result.loss == pytest.approx(np.mean(reference), rel=1e-6)


def test_bits_per_byte_of_a_hand_made_text(tmp_path, tokenizer):
    # Hand count of UTF-8 bytes: "héllo wörld" = h·é(2)·l·l·o·space·w·ö(2)·r·l·d = 13;
    # "naïve café" = n·a·ï(2)·v·e·space·c·a·f·é(2) = 12. Total 25.
    lines = ["héllo wörld", "naïve café"]
    path = tmp_path / "hand.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [tokenizer.decode(tokenizer.encode(line)) for line in lines] == lines  # detokenizes to itself
    model = small_model(tokenizer.vocab_size, seed=1)
    text = text_documents(path, tokenizer)
    nll = sum(reference_nll(model, token_stream(text.documents, tokenizer.eod_id), seq_length=64))
    result = evaluate_lm(model, text, tokenizer, seq_length=64, progress=False)
    assert result.bytes == 25
    assert result.bits_per_byte == pytest.approx(nll / (math.log(2) * 25), rel=1e-5)



def test_bits_per_byte_counts_the_text_as_written_not_the_tokenizers_round_trip(tmp_path, tokenizer):
    """The tokenizer normalises (NFKC folds full-width letters, whitespace runs collapse): counting
    the detokenized bytes would make bits per byte depend on the tokenizer, which is its purpose not to."""
    lines = ["    def  ｆｕｌｌ(self):", "        return   ｗｉｄｔｈ"]
    path = tmp_path / "snippet.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written = sum(len(line.encode("utf-8")) for line in lines)
    text = text_documents(path, tokenizer)
    decoded = sum(len(tokenizer.decode(doc.tolist()).encode("utf-8")) for doc in text.documents)
    assert decoded < written  # the round trip lost bytes
    model = small_model(tokenizer.vocab_size, seed=1)
    nll = sum(reference_nll(model, token_stream(text.documents, tokenizer.eod_id), seq_length=64))
    result = evaluate_lm(model, text, tokenizer, seq_length=64, progress=False)
    assert (result.bytes, result.detokenized_bytes, result.bytes_of) == (written, decoded, "text as written")
    assert result.bits_per_byte == pytest.approx(nll / (math.log(2) * written), rel=1e-5)

def repeat_model(vocab_size: int) -> DecoderLM:
    """A model that predicts its current token again, with near certainty: every residual branch
    writes zero (attention, SwiGLU and L³ outputs), so the final state is the token's embedding,
    and the output matrix is the embedding, so logit(v) = e_v·e_t/rms(e_t) peaks at v = t
    (≈ 32 against ≈ N(0, 32) for the others, with unit Gaussian embeddings of width 32)."""
    model = small_model(vocab_size, seed=2)
    with torch.no_grad():
        model.embedding.weight.normal_(0.0, 1.0)
        model.output.weight.copy_(model.embedding.weight)
        for name, param in model.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "mix.weight")):
                param.zero_()
    return model


def test_multiple_choice_picks_the_answer_it_must(tokenizer):
    model = repeat_model(tokenizer.vocab_size)
    # Under the repeat model only a continuation repeating the context's last token is likely.
    words = [word for word in ("the", "of", "and", "to", "is", "a")
             if len(tokenizer.encode(f"x {word} {word}")) == len(tokenizer.encode("x")) + 2]
    assert len(words) >= 4, "the tokenizer should keep these frequent words whole"
    examples = []
    for index, word in enumerate(words):
        others = [other for other in words if other != word][:3]
        choices = [f" {other} {other} {other}" for other in others]
        choices.insert(index % 4, f" {word} {word}")  # shorter than the others, at a varying place
        examples.append(Example(f"I said {word} {word}", tuple(choices), index % 4))
    result = evaluate_multiple_choice(model, tokenizer, examples, batch_size=3, progress=False)
    assert result.accuracy == 1.0 and result.accuracy_norm == 1.0
    assert result.chance == 0.25
    # A choice's score is the log-probability of its tokens after the context's, from one forward pass.
    context = [tokenizer.eod_id, *tokenizer.encode(examples[0].context)]
    full = [tokenizer.eod_id, *tokenizer.encode(examples[0].context + examples[0].choices[1])]
    assert full[:len(context)] == context
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), -1)
    expected = sum(float(logprobs[j - 1, full[j]]) for j in range(len(context), len(full)))
    assert result.scores[0][1] == pytest.approx(expected, rel=1e-5)



def test_length_normalised_accuracy_divides_by_the_choices_bytes(tokenizer):
    """Raw and length-normalised accuracy disagree on purpose. Under the repeat model a token costs
    about the same unless it repeats the one before (then ~0). The answer has two costly tokens
    in 31 bytes (5 tokens): worst raw score, best per byte. The decoys: " a a a a", one costly
    token in 4 tokens (best per token), and " of", one in 3 bytes (best raw, and best if scores
    were multiplied by length). Normalising by the context changes nothing against raw."""
    model = repeat_model(tokenizer.vocab_size)
    context, choices = "I said the the", (" of object object object object", " a a a a", " of")
    assert [len(tokenizer.encode(word)) for word in (" of", " object", " a")] == [1, 1, 1]
    result = evaluate_multiple_choice(model, tokenizer, [Example(context, choices, 0)], progress=False)
    scores = np.array(result.scores[0])
    utf8_bytes = np.array([len(choice.encode("utf-8")) for choice in choices])
    tokens = np.array([len(tokenizer.encode(context + choice)) - len(tokenizer.encode(context)) for choice in choices])
    # The example separates the normalisations (else this test could not tell them apart).
    assert (utf8_bytes.tolist(), tokens.tolist()) == ([31, 8, 3], [5, 4, 1])
    assert (scores / utf8_bytes).argmax() == 0
    assert scores.argmax() != 0 and (scores / tokens).argmax() != 0 and (scores * utf8_bytes).argmax() != 0
    assert (result.accuracy, result.accuracy_norm) == (0.0, 1.0)

def test_diagnostics_of_a_hand_built_layer_give_known_entropies():
    # Token 0: one row; token 1: four equal keys (even spread: entropy log 4); token 2: eight
    # keys of which one scores 50 above the others (entropy ~0); token 3: never seen.
    rows = np.array([1, 4, 8, 2])
    cfg = ModelConfig(vocab_size=4, d_model=4, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden_size=8, max_seq_len=8)
    model = DecoderLM(cfg, L3Config(after_blocks=[0], d_emb=4, d_up=8), rows, None).eval()
    layer = model.lookups["0"].lookup
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]).repeat(3, 1)  # 6 positions
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        keys = layer.rows.key_table
        keys.normal_()
        keys[1:5] = torch.tensor([0.3, -0.7, 0.2, 0.5])  # token 1's four rows, all equal
        keys[5:13] = 0.0
        keys[5] = 50.0  # token 2's first row: x·k = 50 for both x, the other seven rows score 0
    with L3Diagnostics(model) as diagnostics, torch.no_grad():
        layer(x, ids)
        _, kernel_entropy = layer.lookup(x, ids)  # the method, not a forward: the hook does not see it
    stats = diagnostics.result()[0]
    np.testing.assert_allclose(stats.entropy, [0, 0, math.log(4), math.log(4), 0, 0], atol=1e-12)
    np.testing.assert_allclose(stats.top1, [1, 1, 0.25, 0.25, 1, 1], atol=1e-12)
    np.testing.assert_array_equal(stats.rows, [1, 1, 4, 4, 8, 8])
    # The training kernel's entropies agree with the reference computation.
    np.testing.assert_allclose(kernel_entropy.numpy(), stats.entropy, atol=1e-5)
    seen, used = stats.rows_used_fraction()
    np.testing.assert_array_equal(seen, [0, 1, 2])
    np.testing.assert_allclose(used, [1.0, 1.0, 1 / 8])
    assert stats.entropy_by_rows() == [(1, 2, 0.0), (4, 2, pytest.approx(math.log(4))), (8, 2, pytest.approx(0.0))]
    summary = stats.summary()
    assert summary["tokens_seen"] == 3 and summary["positions"] == 6
    assert summary["normalized_entropy_mean"] == pytest.approx(0.5)  # tokens 1 (1.0) and 2 (0.0)
    assert summary["rows_used_fraction_weighted"] == pytest.approx((2 + 2 + 2 / 8) / 6)
    # The hooks are gone after the block: nothing more is recorded.
    layer(x, ids)
    assert len(diagnostics.result()[0].entropy) == 6



def test_diagnostics_read_only_the_rows_of_the_batch_tokens():
    """On a GPU the tables are gigabytes: the hook gathers the batch's rows there and copies those."""
    from l3train.eval.diagnostics import batch_rows

    rows_per_token = torch.tensor([3, 1, 5, 2, 4, 7])
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(rows_per_token, 0)])
    keys = torch.randn(int(bounds[-1]), 6)
    token_ids = torch.tensor([4, 1, 4, 2, 1, 1])
    batch = batch_rows(keys, bounds, token_ids)
    assert batch.tokens.tolist() == [1, 2, 4]
    assert batch.keys.shape == (1 + 5 + 4, 6)  # the rows of tokens 1, 2 and 4, not the table's 22
    for local, token in enumerate(batch.tokens.tolist()):
        start, end = int(bounds[token]), int(bounds[token + 1])
        assert int(batch.starts[local]) == start
        assert torch.equal(batch.keys[int(batch.local_bounds[local]):int(batch.local_bounds[local + 1])],
                           keys[start:end])
    assert torch.equal(batch.tokens[batch.local_ids], token_ids)

def test_logit_lens_matches_a_manual_early_exit():
    model = small_model(64, seed=3)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with LogitLens(model) as lens, torch.no_grad():
        final = model(tokens).logits
    curve = lens.result()
    assert [point.name for point in curve] == ["block 0", "L³ after block 0", "block 1"]
    assert [point.after_l3 for point in curve] == [False, True, False]
    # The manual forward: read out the residual stream after each block and the L³ layer.
    with torch.no_grad():
        cos, sin = model.rope_cos[:12], model.rope_sin[:12]
        h, _ = model.blocks[0](model.embedding(tokens), cos, sin)
        states = [h]
        h, _ = model.lookups["0"](h, tokens)
        states.append(h)
        h, _ = model.blocks[1](h, cos, sin)
        states.append(h)
        target = torch.log_softmax(final.double(), -1)
        for point, state in zip(curve, states):
            early = torch.log_softmax((model.norm(state) @ model.output.weight.t()).double(), -1)
            kl = (target.exp() * (target - early)).sum(-1).mean()
            assert point.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    assert curve[-1].kl == pytest.approx(0.0, abs=1e-6)  # the last block's read-out is the model's own
    assert curve[0].kl > 0


def test_split_range_cuts_like_the_training_split():
    from l3train.data.dataset import _split_tokens

    lengths = np.arange(1, 90)  # 89 documents of distinct lengths: a token count identifies a range
    for split in ("98,2,0", "90,10,0", "80,15,5", "1"):
        tokens = _split_tokens("prefix", lengths, [float(p) / sum(map(float, split.split(","))) for p in
                                                   (split.split(",") + ["0", "0"])[:3]])
        for part, expected in zip(("train", "valid", "test"), tokens):
            begin, end = split_range(len(lengths), split, part)
            assert lengths[begin:end].sum() == expected, (split, part)
    assert split_range(89, "98,2,0", "all") == (0, 89)
    with pytest.raises(L3TrainError, match="split part"):
        split_range(89, "98,2,0", "dev")


def test_continuation_task_is_deterministic_and_right(tiny_corpus):
    documents = list(tiny_corpus.documents[:40])
    task = continuation_task(documents, examples=30, choices=4, context_words=10, continuation_words=5, seed=3)
    assert task == continuation_task(documents, examples=30, choices=4, context_words=10, continuation_words=5,
                                     seed=3)
    assert len(task) == 30
    for example in task:
        words = documents[example.extra["document"]].split()
        start = example.extra["word"]
        assert example.context == " ".join(words[start:start + 10])
        assert example.choices[example.label] == " " + " ".join(words[start + 10:start + 15])
        assert len(set(example.choices)) == 4
        assert all(len(choice.split()) == 5 for choice in example.choices)
    assert sorted({example.label for example in task}) == [0, 1, 2, 3]  # the answer's place varies


def test_shipped_example_task_loads():
    examples = load_task(REPO / "configs/tasks/stdlib_continuation_example.jsonl")
    assert len(examples) == 8 and all(len(example.choices) == 4 for example in examples)


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": [" b", " c"]}', "no 'label' field"),
    ('{"context": "a", "choices": [" b", " c"], "label": 2}', "label must be an index"),
    ('{"context": "a", "choices": [" b"], "label": 0}', "at least two"),
    ('{"context": "a", "choices": [" b", " c"], "label": true}', "label must be an index"),
    ('not json', "invalid JSON"),
])
def test_malformed_task_lines_are_named(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": [" y", " z"], "label": 0}) + "\n" + line + "\n")
    with pytest.raises(L3TrainError, match=f"task.jsonl:2: .*{message}"):
        load_task(path)


def test_examples_that_do_not_fit_are_skipped_and_counted(tokenizer):
    model = repeat_model(tokenizer.vocab_size)  # 64 positions
    long_choice = " " + " ".join(["the"] * 80)
    fits = Example("I said the the", (" the the", " of of"), 0)
    too_long = Example("I said the", (" the", long_choice), 0)
    result = evaluate_multiple_choice(model, tokenizer, [fits, too_long, fits], progress=False)
    assert (result.examples, result.skipped, result.accuracy) == (2, 1, 1.0)
    # A long context is cut from the left instead: the example is still scored.
    long_context = Example(" ".join(["of"] * 100) + " the the", (" the the", " of of"), 0)
    assert evaluate_multiple_choice(model, tokenizer, [long_context], progress=False).accuracy == 1.0
    with pytest.raises(L3TrainError, match="no example fits"):
        evaluate_multiple_choice(model, tokenizer, [too_long], progress=False)


def test_throughput_weighs_each_logged_interval_by_its_time(tmp_path):
    from l3train.study import throughput

    # 10 steps at 1,000 tokens/s, then 10 at 500, 100 tokens a step: 2,000 tokens in 1 s + 2 s.
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val/loss": 7.0}, {"step": 10, "train/loss": 6.0, "train/tokens_per_s": 1000.0},
            {"step": 20, "train/loss": 5.0, "train/tokens_per_s": 500.0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert throughput(path, tokens_per_step=100) == pytest.approx(2000 / 3)


def test_max_tokens_keeps_leading_whole_documents():
    from l3train.eval.data import limit_documents

    documents = [np.zeros(3), np.zeros(4), np.zeros(5)]
    assert [len(doc) for doc in limit_documents(documents, 7)] == [3, 4]  # 3 + 4 = 7 fit, the third would not
    assert [len(doc) for doc in limit_documents(documents, 2)] == [3]  # at least one document
    assert limit_documents(documents, None) is documents
    with pytest.raises(L3TrainError, match="--max-tokens must be positive"):
        limit_documents(documents, 0)
