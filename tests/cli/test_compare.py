"""tk compare: curves of several runs on one PNG and a table with exact figures from the run files."""
import json

import torch

from toolkit.cli.main import main


def fake_run(root, name, losses, val=None, tokens=(100.0, 200.0, 300.0), params=(3, 4)):
    run = root / name
    vis = run / "20260101_000000" / "vis_data"
    vis.mkdir(parents=True)
    lines = [{"loss": loss, "tokens_per_sec": tokens[i % len(tokens)], "time": 1.0 + i, "step": 2 * (i + 1)}
             for i, loss in enumerate(losses)]
    lines += [{"val/loss": v, "step": 4 * (i + 1)} for i, v in enumerate(val or [])]
    (vis / "scalars.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    torch.save({"state_dict": {f"w{i}": torch.zeros(n) for i, n in enumerate(params)}}, run / "iter_6.pth")
    return run


def test_compare_plots_and_prints_table(tmp_path, capsys):
    a = fake_run(tmp_path, "lora", [2.0, 1.5, 1.25], val=[1.8])
    b = fake_run(tmp_path, "quanta", [2.0, 1.75, 1.5], params=(10,))
    out = tmp_path / "fig.png"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["lora", "7", "1.2500", "1.8000", "260"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["quanta", "10", "1.5000", "-", "260"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no such work dir" in capsys.readouterr().err
    a = fake_run(tmp_path, "lora", [1.0])
    (tmp_path / "x.png").write_bytes(b"keep")
    assert main(["compare", str(a), "--out", str(tmp_path / "x.png")]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "x.png").read_bytes() == b"keep"
