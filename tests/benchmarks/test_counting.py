"""benchmarks/counting.py: the thin command line around clipcount.synthetic.benchmark.

(No __init__.py in this folder on purpose: with one, pytest would put tests/ on sys.path and
`import benchmarks` would find this folder instead of the repository's benchmarks package.)
"""

from __future__ import annotations

import json

import torch

from benchmarks import counting
from clipcount.config import tiny_config
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount


def test_command_line(tmp_path, capsys, monkeypatch):
    from clipcount.synthetic import benchmark
    from clipcount.synthetic.world import WorldConfig

    small = WorldConfig(mode="test", height=128, min_width=128, max_width=192, min_size=5.0, max_size=16.0,
                        max_per_class=20, classes_per_scene=(2, 3))
    monkeypatch.setattr(benchmark, "benchmark_world", lambda: small)
    torch.manual_seed(0)
    main = save_model(ClipCount(tiny_config()), tmp_path / "main",
                      extra={"synthetic": {"train_mean_count": 5.0, "train_seeds": [0, 123]}})
    other = save_model(ClipCount(tiny_config()), tmp_path / "no_visual_prompts")
    out = tmp_path / "cli.json"
    code = counting.main(["--model", str(main), "--ablations", str(other), "--n", "1", "--seed", "99",
                          "--train-mean", "3", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out classes (zero-shot)" in text and "absent class (true 0)" in text and "targets:" in text
    assert set(json.loads(out.read_text())["results"]) == {"main", "no_visual_prompts"}
    assert counting.main(["--model", str(main), "--seed", "123", "--n", "1", "--quiet"]) == 2
