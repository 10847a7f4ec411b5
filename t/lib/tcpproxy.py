"""A TCP proxy in front of a server, for the tests that stand between a
client (the gateway, the keys tool) and Redis.  Each connection it
accepts is joined to a connection of its own to the target: what the
target sends goes back through backward(), what the client sends goes
on through forward(); both pass everything as it comes, and a test's
proxy overrides them to hold, count or delay it.
close() ends the listener and every connection, and waits for the
proxy's threads."""

import socket
import threading


def shut(*socks):
    """Shuts both ways of each socket, whatever state it is in."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class TcpProxy:
    """target: (host, port); rcvbuf: the receive buffer of the accepted
    connections (smaller than the kernel's default: the kernel then
    holds little of what the client sends while forward() does not
    read)."""

    def __init__(self, target, rcvbuf=None):
        self.target = target
        self.lock = threading.Lock()
        self.socks = []
        self.threads = []
        self.listener = socket.socket()
        if rcvbuf:
            # accepted sockets take the listener's receive buffer
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                     rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.addr = "127.0.0.1:%d" % self.port
        self.start(self._accept)

    def forward(self, c, s):
        """Passes what the client sends on c to the target on s, until
        either ends."""
        self.pump(c, s)

    def backward(self, s, c):
        """Passes what the target sends on s back to the client on c,
        until either ends."""
        self.pump(s, c)

    def closing(self):
        """Called first by close(): lets go of whatever forward() or
        backward() waits for."""

    def close(self):
        """Ends the proxy and every connection through it; returns the
        threads of it still running ten seconds later (none should)."""
        self.closing()
        # wakes the accept() under way: a close() alone would not
        shut(self.listener)
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        shut(*socks)
        for t in list(self.threads):
            t.join(10)
        alive = [t for t in self.threads if t.is_alive()]
        if not alive:
            for s in socks:
                s.close()
        return alive

    def start(self, target, *args):
        t = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()

    @staticmethod
    def pump(src, dst):
        try:
            while True:
                d = src.recv(65536)
                if not d:
                    break
                dst.sendall(d)
        except OSError:
            pass
        finally:
            shut(src, dst)

    def _backward(self, s, c):
        try:
            self.backward(s, c)
        except OSError:
            pass
        finally:
            shut(s, c)

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.socks.append(c)
            self.start(self._serve, c)

    def _serve(self, c):
        try:
            s = socket.create_connection(self.target)
        except OSError:
            shut(c)
            return
        with self.lock:
            self.socks.append(s)
        self.start(self._backward, s, c)
        try:
            self.forward(c, s)
        except OSError:
            pass
        finally:
            shut(s, c)
