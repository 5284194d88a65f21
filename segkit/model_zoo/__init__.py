"""Model zoo: downloading and caching published weights (see :mod:`segkit.model_zoo.download`)."""
from segkit.model_zoo.download import DownloadError, cache_dir, download, file_sha256

__all__ = ["DownloadError", "cache_dir", "download", "file_sha256"]
