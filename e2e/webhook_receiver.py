"""A webhook receiver that verifies every request with the official `standardwebhooks`
package (PyPI), as a developer's endpoint would. Run by cli/tests/webhooks.rs:

    python webhook_receiver.py PORT    (the secret in AIHUB_WEBHOOK_SECRET)

For each request it prints one line, `verified <type> <event id>` (and answers 204) or
`rejected <reason>` (and answers 400), and flushes at once.
"""
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HOOK = Webhook(os.environ["AIHUB_WEBHOOK_SECRET"])


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            event = HOOK.verify(body, dict(self.headers))
        except WebhookVerificationError as e:
            print("rejected", e, flush=True)
            self.send_response(400)
            self.end_headers()
            return
        print("verified", event["type"], event["id"], flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
