"""A stand-in app for the soak test: /obj/<n> returns a deterministic body of 2-64 KiB,
cacheable for an hour; /api/<n> is dynamic (no-store). Listens on 127.0.0.1:$PORT."""
import hashlib, http.server, os, socketserver

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        kind, _, n = self.path.strip("/").partition("/")
        try:
            n = int(n.split("?")[0])
        except ValueError:
            n = -1
        if kind not in ("obj", "api") or n < 0:
            self.send_response(404); self.send_header("content-length", "0"); self.end_headers(); return
        size = 2048 + (n * 7919) % (62 * 1024)
        seed = hashlib.sha256(str(n).encode()).digest()
        body = (seed * (size // len(seed) + 1))[:size]
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "public, max-age=3600" if kind == "obj" else "no-store")
        self.send_header("etag", '"%s"' % seed.hex()[:16])
        self.end_headers()
        self.wfile.write(body)

class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

S(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
