import os

# One thread per process, set before torch is imported (and inherited by the scripts the tests
# run): the models here are tiny, and on a busy machine OpenMP threads that outnumber the
# cores slow everything down many times over.
os.environ.setdefault('OMP_NUM_THREADS', '1')
