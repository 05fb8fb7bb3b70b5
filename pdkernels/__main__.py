"""`python -m pdkernels`: compile pdserve's CPU kernels now (make install does), rather than at the first
request; prints whether they are ready."""
import logging

from pdkernels import cpu_native

logging.basicConfig(level=logging.INFO, format="%(message)s")
print("pdserve CPU kernels:", "ready" if cpu_native.library() is not None else "unavailable (torch's paths are used)")
