"""tools/bench_padding.py counts what a step computes the way the collate functions pad."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from bench_padding import padding_figures  # noqa: E402


def test_unpacked_batches_pad_to_their_longest_row():
    lengths = [10, 2, 7, 1]
    figures = padding_figures(lengths, batch_size=2, mode="random", packed=False, max_length=16)
    # the same random order as the tool: every step pads its rows to the longest one
    from bench_padding import batches
    steps = batches(lengths, 2, "random")
    assert figures["computed_positions"] == sum(2 * max(lengths[i] for i in s) for s in steps)
    assert figures["real_tokens"] == 20 and figures["steps"] == 2


def test_length_grouping_pads_less_than_random_order():
    lengths = [100, 3] * 32
    grouped = padding_figures(lengths, 4, "length_grouped", packed=False, max_length=128)
    assert grouped["real_share"] == 1.0  # rows of equal length end up together
    assert padding_figures(lengths, 4, "random", packed=False, max_length=128)["real_share"] < 0.8


def test_packed_rows_have_no_padding_and_report_their_fill():
    figures = padding_figures([16, 12], 1, "random", packed=True, max_length=16)
    assert figures["real_share"] == 1.0 and figures["row_fill_of_max_length"] == 0.875


def test_write_lengths_writes_the_real_samples_token_lengths(tmp_path, capsys):
    """The lengths tools/bench_packing_gpu.py trains on: CHAMP under SmolLM2's template, one per sample."""
    import json
    from bench_padding import main
    out = tmp_path / "lengths.json"
    assert main(["--write-lengths", str(out)]) == 0
    lengths = json.loads(out.read_text())
    figures = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lengths) == figures[0]["samples"] and sum(lengths) == figures[1]["real_tokens"]
    assert all(0 < n <= 2048 for n in lengths)
    assert lengths == json.loads((Path(__file__).resolve().parents[2] / "tools" / "champ_lengths.json").read_text())
