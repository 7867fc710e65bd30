"""Baseline: the least a Python NDJSON JSON-RPC peer can do per message (parse, answer, flush)."""

import json
import sys


def main() -> None:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        message = json.loads(line)
        out.write(b'{"jsonrpc":"2.0","id":%s,"result":{}}\n' % json.dumps(message["id"]).encode())
        out.flush()


if __name__ == "__main__":
    main()
