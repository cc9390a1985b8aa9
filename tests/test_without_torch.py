"""The NumPy reference and its command line must work on a machine without torch (an optional extra)."""

import subprocess
import sys
import textwrap


def test_reference_and_cli_run_with_torch_unimportable(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from click.testing import CliRunner
        from safetensors.numpy import save_file
        from toolkit.cli import cli

        rng = np.random.default_rng(0)
        save_file({{"w": rng.standard_normal((16, 32)).astype(np.float32)}}, r"{tmp_path}/w.safetensors")
        np.save(r"{tmp_path}/x.npy", rng.standard_normal((64, 32)).astype(np.float32))
        out = CliRunner().invoke(cli, ["factorize", r"{tmp_path}/w.safetensors", "--calib", r"{tmp_path}/x.npy",
                                       "--block-size", "8", "--sweeps", "2"])
        assert out.exit_code == 0, out.output
        bad = CliRunner().invoke(cli, ["factorize", r"{tmp_path}/w.safetensors", "--calib", r"{tmp_path}/x.npy",
                                       "--backend", "torch"])
        assert bad.exit_code != 0 and "Traceback" not in bad.output, bad.output
        print("torch" in sys.modules and sys.modules["torch"] is not None)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("False")
    assert (tmp_path / "w.armor.safetensors").exists()
