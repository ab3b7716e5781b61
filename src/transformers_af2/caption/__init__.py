"""Caption and label audio at scale: `af2 caption`, and the resumable, data-parallel generation engine under it."""

from ..runstore import RunStore
from .command import caption
from .engine import GenerationJob, ProcessGroup, RunSummary, jobs_for_clips, run_generation_jobs
from .inputs import Clip, DatasetAudio, discover_clips, row_id

__all__ = [
    "Clip",
    "DatasetAudio",
    "GenerationJob",
    "ProcessGroup",
    "RunStore",
    "RunSummary",
    "caption",
    "discover_clips",
    "jobs_for_clips",
    "row_id",
    "run_generation_jobs",
]
