import asyncio

import services.gpu_worker.quiet  # noqa: F401  (before diffusers is imported)
from services.gpu_worker.app import main

asyncio.run(main())
