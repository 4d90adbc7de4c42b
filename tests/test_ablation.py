"""ablation.py: the rules that choose an epoch and a learning rate, the protocol's order (the grid on the first
seed, then the other seeds at each variant's choice), and the whole experiment on a tiny budget, a tiny demo
and a tiny base: what each run is read at, the sizes it reports, the scores of the export it keeps, the sets
of each class's loss, the cache, and the compute-matched arm's steps."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

import data
from demo import DemoConfig, ensure_base
from eval import demo_accuracy
from infra.records import read_all_records
from sample import Generator
from tools import ablation

pytestmark = pytest.mark.slow  # the whole file: the full suite only


def test_a_run_is_read_at_its_best_validation_epoch_the_earliest_of_equals():
    assert ablation.choose_epoch([0.2, 0.5, 0.4]) == 1
    assert ablation.choose_epoch([0.5, 0.3, 0.5, 0.1]) == 0
    assert ablation.choose_epoch([0.0, 0.0]) == 0


def fake_result(validation: list[float], lr: float, seed: int) -> dict:
    chosen = ablation.choose_epoch(validation)
    return {"spec": {"lr": lr, "seed": seed}, "chosen": f"epoch-{chosen + 1}",
            "curve": [{"export": f"epoch-{i + 1}", "step": i, "validation": v} for i, v in enumerate(validation)]}


def test_the_learning_rate_is_the_best_at_its_chosen_epoch_the_smallest_of_equals():
    grid = {1e-3: fake_result([0.1, 0.6, 0.2], 1e-3, 0), 3e-3: fake_result([0.5, 0.5, 0.55], 3e-3, 0),
            1e-2: fake_result([0.3, 0.2, 0.1], 1e-2, 0)}
    assert ablation.choose_lr(grid) == 1e-3  # 0.6 at its second epoch beats 0.55 at the other's last
    grid[3e-3] = fake_result([0.6, 0.0, 0.0], 3e-3, 0)
    assert ablation.choose_lr(grid) == 1e-3  # a tie: the smaller rate


class ScriptedRunner:
    """The runner's interface with scripted validation curves instead of training, to test the protocol's
    order: each variant's best rate is a different one of the grid."""

    def __init__(self, lrs):
        self.arm, self.lrs, self.order = ablation.ARMS["main"], lrs, []

    def size(self, job):
        return 10, 1000, 2

    def run(self, job):
        self.order.append(job)
        trained = [n for n in self.arm.variants if not ablation.BY_NAME[n].runs_of]
        best = self.lrs[trained.index(job.variant) % len(self.lrs)]
        return fake_result([0.3, 0.5 + 0.1 * (job.lr == best), 0.4 + 0.01 * job.seed], job.lr, job.seed)


def test_the_protocol_tries_the_grid_on_the_first_seed_then_runs_the_others_at_the_choice():
    cfg = ablation.AblationConfig(seeds=3, lrs=[1e-3, 3e-3, 1e-2], workers=2)
    runner = ScriptedRunner(cfg.lrs)
    results = ablation.run_protocol(cfg, runner, {"work_s": 0.0, "job_s": lambda steps: 0.0})
    trained = [n for n in runner.arm.variants if not ablation.BY_NAME[n].runs_of]
    assert list(results) == trained and len(runner.order) == len(trained) * (3 + 2)
    for i, name in enumerate(trained):
        entry, best = results[name], cfg.lrs[i % 3]
        assert entry["lr"] == best and sorted(entry["grid"]) == cfg.lrs
        assert [(r["spec"]["seed"], r["spec"]["lr"]) for r in entry["runs"]] == [(0, best), (1, best), (2, best)]
        jobs = [j for j in runner.order if j.variant == name]
        assert all(j.seed == 0 for j in jobs[:3]) and all(j.seed > 0 and j.lr == best for j in jobs[3:])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny demo and a tiny base pretrained on its corpus by demo.py; the ablation takes both."""
    root = tmp_path_factory.mktemp("ablation")
    demo = DemoConfig(out=str(root / "demo"), base_out=str(root / "base"), base_model="tiny",
                      batch_max_len=1024, conversations=300, holdout_prompts=16, validation_prompts=16,
                      base_documents=200, vocab_size=420, seed=6)
    ensure_base(demo)
    cfg = ablation.AblationConfig(out=str(root / "ablation"), demo=demo.out, seeds=2, lrs=[1e-3, 1e-2],
                                  epochs=2, batch_max_len=1024)
    return cfg, ablation.ablation(cfg)


def test_the_main_table_on_a_tiny_budget(tiny):
    cfg, results = tiny
    out = Path(cfg.out)
    table = (out / "main.md").read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:9]]
    assert [r[0] for r in rows] == [v.name for v in ablation.VARIANTS]
    assert [r[8] for r in rows] == [v.paper for v in ablation.VARIANTS]
    for r in rows:
        for cell in r[2:8]:
            mean, sd = (float(x) for x in cell.split(" ± "))
            assert mean >= 0 and sd >= 0
    assert (out / "main.png").stat().st_size > 10_000
    assert json.loads((out / "main.json").read_text())["base"]["held_out_loss"] > 0

    for name, entry in results.items():
        assert entry["lr"] == ablation.choose_lr(entry["grid"]) and entry["runs"][0] is entry["grid"][entry["lr"]]
        assert [(r["spec"]["seed"], r["spec"]["lr"]) for r in entry["runs"]] == [(0, entry["lr"]), (1, entry["lr"])]
        for result in list(entry["grid"].values()) + entry["runs"][1:]:
            run = out / "demo" / ablation.slug(name) / f"lr-{result['spec']['lr']:g}-seed-{result['spec']['seed']}"
            curve = [c["validation"] for c in result["curve"]]
            assert [c["export"] for c in result["curve"]] == ["epoch-1", "epoch-2"]
            assert result["chosen"] == f"epoch-{ablation.choose_epoch(curve) + 1}"
            assert [p.name for p in (run / "exports").iterdir()] == [result["chosen"]]  # only the one read
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert result["steps"] == metrics[-1]["step"]
            meta = data.load_meta(out / "demo" / ablation.slug(name) / "dataset")
            assert result["tokens"] == cfg.epochs * meta["splits"]["train"]["tokens"]  # every conversation, each epoch


def test_the_scores_are_those_of_the_export_read_and_each_class_loss_has_its_training_condition(tiny):
    cfg, results = tiny
    out = Path(cfg.out)
    crlft = results["C-RLFT (condition + weights)"]["runs"][1]
    export = out / "demo" / "c-rlft" / f"lr-{crlft['spec']['lr']:g}-seed-1" / "exports" / crlft["chosen"]
    gen = Generator.load(export, device="cpu")
    held_out = read_all_records(Path(cfg.demo) / "holdout.jsonl")
    for name, condition in (("C-RLFT (condition + weights)", "GPT4"),
                            ("C-RLFT, prompted with the sub-optimal condition", "GPT3")):
        assert crlft["held_out"][name] == demo_accuracy(gen, held_out, condition, max_new_tokens=cfg.max_new_tokens)
    conditions = {name: [s["condition"] for s in data.load_meta(out / "demo" / ablation.slug(name) / "held-out-loss")
                         ["sources"]] for name in results}
    assert conditions["C-RLFT (condition + weights)"] == ["GPT4", "GPT3"]
    assert conditions["condition only (equal weights)"] == ["GPT4", "GPT3"]
    assert conditions["weights only (no condition)"] == conditions["SFT on expert data only"] == ["", ""]


def test_runs_already_done_are_read_back_and_the_compute_matched_arm_gets_c_rlft_s_steps(tiny, capsys):
    cfg, main = tiny
    matched = ablation.ablation(replace(cfg, arm="compute-matched", seeds=1, lrs=[1e-3]))
    printed = capsys.readouterr().out
    steps = matched["C-RLFT (condition + weights)"]["runs"][0]["steps"]
    assert all(entry["runs"][0]["steps"] == steps for entry in matched.values())
    expert = matched["SFT on expert data only"]["runs"][0]
    assert len(expert["curve"]) > cfg.epochs and expert["spec"]["max_steps"] == steps  # more epochs of less data
    # C-RLFT's run is the main table's own run at that rate and seed: read back, not trained again
    assert "C-RLFT (condition + weights), lr 0.001, seed 0: " in printed
    assert printed.split("C-RLFT (condition + weights), lr 0.001, seed 0: ")[1].split("\n")[0].count("(cached)") == 1
    assert matched["C-RLFT (condition + weights)"]["runs"][0]["curve"] == main["C-RLFT (condition + weights)"]["grid"][
        1e-3]["curve"]
