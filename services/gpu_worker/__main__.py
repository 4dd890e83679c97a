import asyncio

from services.gpu_worker.app import main

asyncio.run(main())
