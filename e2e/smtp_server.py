"""An SMTP server over TLS for the mailer's tests (aiosmtpd): STARTTLS required, or implicit TLS.

    python smtp_server.py --port P --mode starttls|tls --cert server.crt --key server.key --maildir DIR

Each message received is written to DIR/<n>.eml (written to a temporary name, then renamed, so a
reader never sees half a message). Prints `ready` once it listens; runs until killed. A message
sent before STARTTLS is refused (`530`), so a message in DIR proves it travelled over TLS.
"""

import argparse
import os
import ssl
import threading

from aiosmtpd.controller import Controller


class Save:
    def __init__(self, maildir):
        self.maildir = maildir
        self.n = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.n += 1
            n = self.n
        tmp = os.path.join(self.maildir, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(tmp, os.path.join(self.maildir, f"{n}.eml"))
        return "250 OK"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["starttls", "tls"], required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--maildir", required=True)
    a = p.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    handler = Save(a.maildir)
    if a.mode == "starttls":
        c = Controller(handler, hostname="127.0.0.1", port=a.port, tls_context=ctx,
                       require_starttls=True)
    else:
        c = Controller(handler, hostname="127.0.0.1", port=a.port, ssl_context=ctx)
    c.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
