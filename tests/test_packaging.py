"""pdserve's top-level import names are its own: no other installed distribution ships a package of the same
name. transformers 5.25 began to require Hugging Face's `kernels` package, which pdserve's kernel package
(then `kernels/`, now `pdkernels/`) shadowed: every import of transformers failed."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_installed_distribution_shares_a_top_level_name_with_pdserve():
    owners = importlib.metadata.packages_distributions()
    ours = {name for name, dists in owners.items() if "pdserve" in dists}
    assert {"serving", "scheduler", "kvcache", "pdkernels", "bench"} <= ours
    shared = {name: sorted(set(owners[name]) - {"pdserve"}) for name in ours if set(owners[name]) - {"pdserve"}}
    assert not shared, f"pdserve's top-level packages are also shipped by other distributions: {shared}"


def test_transformers_imports_from_the_repository_root():
    """Tests and `python -m` put the checkout first on sys.path: nothing in it may shadow what transformers
    imports (the model configs pull in its hub-kernels integration)."""
    code = ("import importlib.util, transformers; transformers.LlamaConfig; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    origin = done.stdout.strip()
    assert not origin or Path(origin).parent.parent != ROOT, f"`kernels` resolves to the checkout: {origin}"
