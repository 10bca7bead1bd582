import subprocess
import sys


def test_import_lfdist_is_cheap():
    code = (
        "import sys, lfdist, lfdist.config, lfdist.plan, lfdist.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'ray') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
