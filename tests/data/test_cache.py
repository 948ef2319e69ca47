"""The processed-data cache: reused on the next run, keyed by what changes the result, and shared by
the processes of a multi-process run (local rank 0 builds, the others wait on the disk, no barrier)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import toolkit.data.dataset as dataset_module
from toolkit.data.dataset import build_sft_dataset
from toolkit.errors import UserError

RECORDS = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(30)]


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_second_build_reads_the_cache_and_settings_change_the_key(tokenizer, alpaca_file, monkeypatch):
    first = build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "alpaca", max_length=64)
    built = []
    real_build = dataset_module._build
    monkeypatch.setattr(dataset_module, "_build", lambda *a, **k: built.append(k) or real_build(*a, **k))
    again = build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "alpaca", max_length=64)
    assert built == [] and [again[i] for i in range(30)] == [first[i] for i in range(30)]
    build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "alpaca", max_length=63)
    build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "chatml", max_length=64)
    packed = build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "alpaca", max_length=64,
                               pack_to_max_length=True)
    assert len(built) == 3 and len(packed) < 30
    alpaca_file.write_text(alpaca_file.read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert len(build_sft_dataset(tokenizer, str(alpaca_file), "alpaca", "alpaca", max_length=64)) == 31
    assert len(built) == 4  # the file changed


RANK_SCRIPT = textwrap.dedent("""
    import sys, time
    import toolkit.data.dataset as d
    real = d._build
    def slow_build(*args, **kwargs):
        print("BUILDING", flush=True)
        time.sleep(3)
        return real(*args, **kwargs)
    d._build = slow_build
    from toolkit.errors import UserError
    try:
        dataset = d.build_sft_dataset(sys.argv[1], sys.argv[2], "alpaca", "alpaca", max_length=64)
        print("SAMPLES", len(dataset), dataset[0]["input_ids"][:4], flush=True)
    except UserError as exc:
        print("ERROR", exc, flush=True)
""")


def run_ranks(tmp_path, tokenizer_dir, source):
    env = dict(os.environ, WORLD_SIZE="2")
    procs = []
    for rank in (1, 0):  # the waiting rank starts first
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tokenizer_dir), str(source)],
                                      env=dict(env, LOCAL_RANK=str(rank), RANK=str(rank)), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return [p.communicate(timeout=300)[0] for p in procs]  # [rank 1, rank 0]


def test_rank_zero_builds_and_the_other_rank_waits_then_loads(tmp_path, smollm2_dir, alpaca_file):
    waiter, builder = run_ranks(tmp_path, smollm2_dir, alpaca_file)
    assert "BUILDING" in builder and "BUILDING" not in waiter, (builder, waiter)
    assert "waiting for local rank 0 to build" in waiter
    samples = [line for line in builder.splitlines() + waiter.splitlines() if line.startswith("SAMPLES")]
    assert len(samples) == 2 and samples[0] == samples[1] and samples[0].startswith("SAMPLES 30 ")


def test_a_failed_build_ends_the_waiting_rank_too(tmp_path, smollm2_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"output": "b"}\n')
    waiter, builder = run_ranks(tmp_path, smollm2_dir, bad)
    assert "ERROR" in builder and "record 1: missing field 'instruction'" in builder
    assert "ERROR local rank 0 failed to build the dataset:" in waiter
    assert "record 1: missing field 'instruction'" in waiter


def test_bad_record_message_suggests_skipping(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"output": "b"}\n{"instruction": 1, "output": "b"}\n')
    with pytest.raises(UserError, match=r"record 1: missing field 'instruction' \(line 2\) \(and 1 more bad "
                                        r"records\); fix the data, or set skip_bad_records=True"):
        build_sft_dataset(tokenizer, str(path), "alpaca", use_cache=False)
    assert len(build_sft_dataset(tokenizer, str(path), "alpaca", use_cache=False, skip_bad_records=True)) == 1


def test_num_proc_gives_the_same_samples(tokenizer):
    common = dict(source="champ", map_fn="champ", template="chatml", max_length=400, use_cache=False,
                  pack_to_max_length=True)
    two = build_sft_dataset(tokenizer, num_proc=2, **common)
    one = build_sft_dataset(tokenizer, num_proc=1, **common)
    assert len(two) == len(one) and all(two[i] == one[i] for i in range(len(one)))
