"""bench.py's report: a configuration with too few steps for a steady rate prints dashes, not a crash."""
import bench


def row(**changes) -> dict:
    base = dict(preset="gpt2-small", attn_impl="auto", precision="bf16", compile=True, deterministic=False,
                vocab_rows=50304, micro_batch_size=16, tokens_per_sec=123456.7, mfu=0.4567, peak_memory_gb=14.2,
                skipped_steps=0, final_loss=3.21, val_loss=3.3, wall_s=61.0)
    return dict(base, **changes)


def test_table_shows_a_dash_where_a_run_had_no_steady_interval():
    unmeasured = row(tokens_per_sec=None, mfu=None, peak_memory_gb=None, skipped_steps=None, final_loss=None)
    measured, empty = bench.table([row(), unmeasured]).splitlines()[1:]
    assert measured.split()[-6:] == ["123,457", "45.7%", "14.2", "0", "3.210", "61.0"]
    assert empty.split()[-6:] == ["-", "-", "-", "-", "-", "61.0"]
