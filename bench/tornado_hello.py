"""The framework's own ceiling for the benchmark: Tornado answering a fixed body, no proxying.

python bench/tornado_hello.py PORT FILE CONTENT_TYPE
"""

import asyncio
import sys

import tornado.web


def main() -> None:
    port, path, content_type = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(path, "rb") as f:
        body = f.read()

    class Fixed(tornado.web.RequestHandler):
        def post(self) -> None:
            self.set_header("Content-Type", content_type)
            self.finish(body)

    async def serve() -> None:
        app = tornado.web.Application([(r"/.*", Fixed)], log_function=lambda handler: None)
        app.listen(port, "127.0.0.1", backlog=4096)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
