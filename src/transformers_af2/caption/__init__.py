"""Caption and label audio at scale: `caption()` (what `af2 caption` runs), and the resumable, data-parallel
generation engine under it."""

from ..utils import lazy_exports

# name -> the module defining it, imported on first use: `af2 caption --help` and the packages that read audio lists
# with `caption.inputs` do not import the engine (torch).
_HOMES = {
    "RunStore": "..runstore",
    "caption": ".api",
    "GenerationJob": ".engine",
    "ProcessGroup": ".engine",
    "RunSummary": ".engine",
    "jobs_for_clips": ".engine",
    "run_generation_jobs": ".engine",
    "Clip": ".inputs",
    "DatasetAudio": ".inputs",
    "discover_clips": ".inputs",
    "row_id": ".inputs",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
