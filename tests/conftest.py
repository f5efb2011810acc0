import os

import pytest

# One thread per process, set before torch is imported (and inherited by the scripts the tests
# run): the models here are tiny, and on a busy machine OpenMP threads that outnumber the
# cores slow everything down many times over.
os.environ.setdefault('OMP_NUM_THREADS', '1')

# offline copies of tiny Shakespeare and GPT-2's BPE files, beside the repository; a clone without
# them skips the tests that read them
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data')
needs_shared_data = pytest.mark.skipif(not os.path.isdir(SHARED_DATA),
                                       reason=f"needs {SHARED_DATA}: tiny Shakespeare and GPT-2's BPE files")
