import asyncio

from services.gateway.app import main

asyncio.run(main())
