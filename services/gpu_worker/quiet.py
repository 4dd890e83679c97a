"""Keeps the ML libraries' chatter out of the worker's log.

Diffusers logs the truncated tail of every long prompt (user data) at WARNING, transformers notes
missing optional backends at import, and both draw progress bars; the worker reports progress itself.
Imported before diffusers so the import-time notices are silenced too.
"""

from __future__ import annotations

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()
diffusers_logging.set_verbosity_error()
diffusers_logging.disable_progress_bar()
