"""Local fake chat platforms (aiohttp on 127.0.0.1, port 0) that record every call for tests."""
