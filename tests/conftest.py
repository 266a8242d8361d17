import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# one folder of compiled DeepSpeed ops per virtualenv (scripts/setup.sh builds it; the recipes use the same)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# ... always built with this virtualenv's ninja (system and pip ninja hash commands differently: alternating
# them recompiles the op on every launch)
_bin = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_bin, "ninja")) and not os.environ.get("PATH", "").startswith(_bin + os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")
