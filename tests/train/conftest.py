import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Train in one thread, as the subprocess runs do (``OMP_NUM_THREADS=1``): these models are
    too small to gain from more, and on a busy machine OpenMP's spinning threads slow them many
    times over. Module-scoped, so that module-scoped runs use it too: float sums, and so runs
    meant to be bit-identical, depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
