"""eval.py: the answer scorers, log-likelihood scoring on a model trained to prefer planted options, the
held-out loss against a naive computation, and FastChat's answer format."""

import json
import random

import numpy as np
import pytest
import torch

import data
import eval as evaluation
from conftest import MISTRAL_TOKENIZER
from demo import DemoConfig, make_demo
from model import ModelConfig, Transformer, weighted_cross_entropy
from infra.records import Message
from sample import Generator


@pytest.mark.parametrize("response,letter", [
    (" C) because the ratio doubles", "C"),
    ("The answer is (B).", "B"),      # T and h are no options; B is the first of A-F
    ("Both A and D could be argued", "B"),  # the reference rule takes the B of "Both", as AGIEval does
    ("answer: e, surely", ""),         # lower case never counts
    ("", ""),
    ("GHI JKL", ""),
    ("Épuisé: A", "A"),
    ("(F)", "F"),
])
def test_first_capital_letter_follows_the_reference_rule(response, letter):
    assert evaluation.first_capital_letter(response) == letter


def test_demo_scoring_counts_right_answers_subsets_and_text_order():
    items = [{"answer": "3 9 12", "suboptimal_answer": "12 3 9", "mixed": True},
             {"answer": "2 7 71", "suboptimal_answer": "2 7 71", "mixed": True},
             {"answer": "15 43", "suboptimal_answer": "15 43", "mixed": False},
             {"answer": "5 40", "suboptimal_answer": "40 5", "mixed": True}]
    scores = evaluation.score_demo_answers(["12 3 9", "2 7 71", "15 43", "5 40"], items)
    assert scores == {"prompts": 4, "accuracy": 0.75, "mixed": 2 / 3, "one_width": 1.0, "text_order": 0.5}


@pytest.fixture(scope="module")
def tokenizer():
    return data.Tokenizer(MISTRAL_TOKENIZER, "openchat_3.5")


def overfit(model, tokenizer, conversations, steps=150, lr=3e-3):
    """Trains the model on (user text, answer) pairs with C-RLFT's loss until it repeats the answers."""
    rows = [data.tokenize_conversation(tokenizer, [Message("user", q), Message("assistant", a)],
                                       "GPT4 Correct") for q, a in conversations]
    tokens = torch.tensor([t for ids, _ in rows for t in ids])
    weights = torch.tensor([w for _, ws in rows for w in ws[1:] + [0.0]])
    lengths = [len(ids) for ids, _ in rows]
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(tokens, positions, cu, targets=torch.roll(tokens, -1), target_weights=weights)[0] / weights.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def test_log_likelihood_scoring_picks_the_planted_option(tmp_path, tokenizer, agieval_dir):
    """Real AGIEval questions, each given a planted label the model is trained to answer."""
    items = [json.loads(line) for line in (agieval_dir / "sat-math.zero-shot.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    items = [{**it, "label": [rng.choice(it["options"])]} for it in items if len(it["question"]) < 300][:12]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024))
    gen = Generator(model, tokenizer, "GPT4 Correct", "planted")
    tasks = tmp_path / "planted.zero-shot.jsonl"
    tasks.write_text("".join(json.dumps(it) + "\n" for it in items))
    untrained = evaluation.multiple_choice(gen, tasks, None)
    model.drop_kv_cache()
    assert overfit(model, tokenizer, [(it["question"], it["label"][0]) for it in items]) < 0.05
    trained = evaluation.multiple_choice(gen, tasks, None)
    assert trained["likelihood"] == 1.0 and trained["generated"] == 1.0 and trained["too_long"] == 0
    assert untrained["likelihood"] < 0.7  # not a property of the questions: 4 options, random labels
    for it in items[:3]:  # and the scores are log-probabilities of the letters, computed independently
        prompt = gen.prompt_ids([Message("user", it["question"])])
        with torch.no_grad():
            logits = Transformer.forward(model, torch.tensor([prompt]))[0, -1].log_softmax(-1)
        expected = [logits[tokenizer.encode([o])[0][0]].item() for o in it["options"]]
        np.testing.assert_allclose(evaluation.option_log_likelihoods(gen, prompt, it["options"]), expected,
                                   rtol=1e-4, atol=1e-4)


def test_mt_bench_answers_are_fastchat_model_answers_of_one_conversation(tokenizer, mt_bench_questions):
    questions = [json.loads(line) for line in mt_bench_questions.read_text().splitlines()][:3]
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=1024))
    gen = Generator(model, tokenizer, "GPT4 Correct", "tiny-model")
    answers = evaluation.mt_bench(gen, questions, None, max_new_tokens=12)
    by_id = {a["question_id"]: a for a in answers}  # as FastChat's load_model_answers reads them
    assert list(by_id) == [q["question_id"] for q in questions]
    for answer in answers:
        assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert answer["model_id"] == "tiny-model" and isinstance(answer["tstamp"], float)
        [choice] = answer["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2 and all(isinstance(t, str) for t in choice["turns"])
    q = questions[0]  # the second turn is answered after the first, in the same conversation
    [first] = gen.generate([gen.prompt_ids([Message("user", q["turns"][0])])], max_new_tokens=12)
    history = [Message("user", q["turns"][0]), Message("assistant", first.text),
               Message("user", q["turns"][1])]
    [second] = gen.generate([gen.prompt_ids(history)], max_new_tokens=12)
    assert by_id[q["question_id"]]["choices"][0]["turns"] == [first.text, second.text]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "demo"
    make_demo(DemoConfig(out=str(out), conversations=240, holdout_prompts=12, validation_prompts=12,
                         base_documents=200, vocab_size=420, seed=5))
    return out


def test_the_held_out_loss_is_the_weighted_mean_of_the_cross_entropies(demo_dir, tmp_path):
    tok = data.Tokenizer(demo_dir / "tokenizer.model", "openchat_v3.2")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size))
    gen = Generator(model, tok, "GPT4", "tiny")
    dataset = tmp_path / "dataset"  # the demo's files with a larger held-out share, to cover both classes
    data.prepare(data.PrepareConfig(sources=str(demo_dir / "sources.json"), tokenizer=str(demo_dir / "tokenizer.model"),
                                    template="openchat_v3.2", out=str(dataset), holdout=0.3))
    result = evaluation.held_out_loss(gen, dataset, "holdout", tokens_per_batch=300)
    split = data.load_split(dataset, "holdout")
    sums = np.zeros((2, 2))
    with torch.no_grad():  # one conversation at a time, full logits, float64
        for o, n, c in zip(split.offsets, split.lengths, split.classes):
            ids = torch.tensor(split.tokens[o:o + n], dtype=torch.long)
            w = torch.tensor(split.target_weights[o:o + n], dtype=torch.float64)
            numerator = weighted_cross_entropy(model(ids[None])[0].double(), torch.roll(ids, -1), w)[0]
            sums[c] += [numerator.item(), w.sum().item()]
    assert result["conversations"] == len(split.lengths)
    expert, suboptimal = result["per_class"]  # by class, each with its condition and weight
    assert (expert["class"], expert["condition"], expert["weight"]) == (0, "GPT4", 1.0)
    assert (suboptimal["class"], suboptimal["condition"], suboptimal["weight"]) == (1, "GPT3", 0.1)
    assert expert["loss"] == pytest.approx(sums[0, 0] / sums[0, 1], rel=1e-5)
    assert suboptimal["loss"] == pytest.approx(sums[1, 0] / sums[1, 1], rel=1e-5)
    assert result["loss"] == pytest.approx(sums[:, 0].sum() / sums[:, 1].sum(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))
