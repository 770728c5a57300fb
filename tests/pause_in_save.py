"""For the kill tests: run train.py with a pause injected at one point of the save of one checkpoint.

    python tests/pause_in_save.py POINT STEP MARKER CONFIG.json [train.py flags...]

When the save of STEP reaches POINT, MARKER is created and the process sleeps, so the test can SIGKILL it there:
  mid_state       inside torch.save, part of state.pt written
  before_manifest state.pt complete and fsynced, no MANIFEST.json yet
  before_rename   the temporary directory complete, not yet renamed into place
  before_prune    renamed into place, older checkpoints not yet pruned
The pause is patched in from here, so checkpoint.py carries no test hook. Not a test itself.
"""
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoint  # noqa: E402


def main():
    point, step, marker, *train_args = sys.argv[1:]
    saving = {"step": None}

    def pause(at: str):
        if at == point and saving["step"] == int(step):
            Path(marker).touch()
            time.sleep(120)

    original_save, original_write, original_prune = checkpoint.save, checkpoint._HashingWriter.write, checkpoint._prune
    original_fsync, original_rename = os.fsync, os.rename

    def save(run_dir, at_step, *args, **kwargs):
        saving["step"] = at_step
        return original_save(run_dir, at_step, *args, **kwargs)

    def write(self, data):
        if self.bytes > 4096:
            pause("mid_state")
        return original_write(self, data)

    def fsync(fd):
        original_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(checkpoint.STATE):  # Linux: the file behind the descriptor
            pause("before_manifest")

    def rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(checkpoint.TMP_PREFIX):
            pause("before_rename")
        return original_rename(src, dst, *args, **kwargs)

    def prune(*args, **kwargs):
        pause("before_prune")
        return original_prune(*args, **kwargs)

    checkpoint.save, checkpoint._HashingWriter.write, checkpoint._prune = save, write, prune
    os.fsync, os.rename = fsync, rename  # this process only: it exists to be killed
    sys.argv = ["train.py", *train_args]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
