import asyncio

from services.scheduler.app import main

asyncio.run(main())
