"""Hermetic single-node OpenStack Swift for tests (run with the Swift venv's python).

  swift_launch.py rings ETC_DIR ACCOUNT_PORT CONTAINER_PORT OBJECT_PORT
      builds the three rings (one replica, part power 8, one device each) in one process
  swift_launch.py serve ETC_DIR KIND CONF
      runs one Swift server (proxy|account|container|object) with ETC_DIR/swift.conf,
      never /etc/swift/swift.conf
  swift_launch.py logs SOCKET FILE
      collects the servers' syslog datagrams into FILE (there is no /dev/log here)
  swift_launch.py keystone-template DIR
      creates a Keystone database, keys and admin user once (the install step)
  swift_launch.py keystone DIR PORT
      serves Keystone v3 from DIR (a copy of the template)
  swift_launch.py keystone-register KEYSTONE_URL SWIFT_PORT
      makes the catalog's object-store the Keystone-authenticated Swift proxy
  swift_launch.py tempauth-probe AUTH_URL USER KEY
      succeeds when a tempauth token writes a container and an object
  swift_launch.py keystone-probe KEYSTONE_URL
      succeeds when Keystone issues a token
"""

import os
import socket
import sys


def rings(etc, account_port, container_port, object_port):
    from swift.common.ring import RingBuilder

    for name, port in (("account", account_port), ("container", container_port),
                       ("object", object_port)):
        builder = RingBuilder(8, 1, 1)
        builder.add_dev({
            "id": 0, "region": 1, "zone": 1, "weight": 100, "device": "d1",
            "ip": "127.0.0.1", "port": int(port),
            "replication_ip": "127.0.0.1", "replication_port": int(port),
        })
        builder.rebalance()
        builder.get_ring().save(os.path.join(etc, name + ".ring.gz"))


def serve(etc, kind, conf):
    # Must happen before any Swift module loads the storage policies.
    import swift.common.utils as utils
    utils.SWIFT_CONF_FILE = os.path.join(etc, "swift.conf")
    from swift.common.wsgi import run_wsgi
    sys.exit(run_wsgi(conf, kind + "-server"))


def logs(sock_path, file_path):
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    with open(file_path, "ab", buffering=0) as out:
        while True:
            out.write(sock.recv(65536).rstrip(b"\0") + b"\n")




KEYSTONE_ADMIN = ("admin", "phoenix-keystone-admin", "admin", "Default")


def keystone_conf(state):
    return f"""[DEFAULT]
log_file = {state}/keystone.log
[database]
connection = sqlite:///{state}/keystone.db
[token]
provider = fernet
[fernet_tokens]
key_repository = {state}/fernet-keys
[fernet_receipts]
key_repository = {state}/fernet-keys
[credential]
key_repository = {state}/credential-keys
"""


def keystone_template(state):
    """Creates a Keystone database and keys once (15 s); start copies them (ms)."""
    import subprocess
    os.makedirs(state, exist_ok=True)
    conf = os.path.join(state, "keystone.conf")
    with open(conf, "w") as f:
        f.write(keystone_conf(state))
    manage = [os.path.join(os.path.dirname(sys.executable), "keystone-manage"),
              "--config-file", conf]
    owner = ["--keystone-user", "root", "--keystone-group", "root"]
    user, password, _, _ = KEYSTONE_ADMIN
    # The identity URLs are not used by the tests (they name Keystone's URL themselves).
    for args in (["db_sync"], ["fernet_setup"] + owner, ["credential_setup"] + owner,
                 ["bootstrap", "--bootstrap-username", user,
                  "--bootstrap-password", password,
                  "--bootstrap-public-url", "http://127.0.0.1:5000/v3",
                  "--bootstrap-region-id", "RegionOne"]):
        subprocess.run(manage + args, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def keystone(state, port):
    """Serves Keystone from a copy of the template in `state`."""
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    with open(os.path.join(state, "keystone.conf"), "w") as f:
        f.write(keystone_conf(state))
    sys.argv = sys.argv[:1]  # oslo.config parses the command line
    os.environ["OS_KEYSTONE_CONFIG_DIR"] = state
    from keystone.server import wsgi
    app = wsgi.initialize_public_application()

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    make_server("127.0.0.1", int(port), app, server_class=Server,
                handler_class=Quiet).serve_forever()


def keystone_token(url):
    import json
    import urllib.request
    user, password, project, domain = KEYSTONE_ADMIN
    body = {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": domain}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"name": domain}}}}}
    request = urllib.request.Request(url + "/auth/tokens", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["X-Subject-Token"], json.load(response)["token"]


def keystone_register(url, swift_port):
    """Points the catalog at this Keystone (identity: the template names a placeholder)
    and at the Keystone-authenticated Swift proxy (object-store)."""
    import json
    import urllib.request
    token, _ = keystone_token(url)

    def call(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data, {
            "Content-Type": "application/json", "X-Auth-Token": token}, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response) if response.status != 204 else None

    def set_endpoints(kind, name, endpoint_url):
        services = call("GET", f"/services?type={kind}")["services"]
        if services:
            service = services[0]["id"]
        else:
            service = call("POST", "/services", {"service": {
                "type": kind, "name": name}})["service"]["id"]
        for endpoint in call("GET", f"/endpoints?service_id={service}")["endpoints"]:
            call("DELETE", f"/endpoints/{endpoint['id']}")
        for interface in ("public", "internal", "admin"):
            call("POST", "/endpoints", {"endpoint": {
                "service_id": service, "interface": interface, "region_id": "RegionOne",
                "url": endpoint_url}})

    set_endpoints("identity", "keystone", url)
    set_endpoints("object-store", "swift",
                  f"http://127.0.0.1:{swift_port}/v1/KEY_$(project_id)s")


def tempauth_probe(url, user, key):
    """Succeeds when tempauth issues a token that writes a container and an object (the
    proxy, account, container and object servers all take part)."""
    import urllib.request
    request = urllib.request.Request(url, headers={"X-Auth-User": user, "X-Auth-Key": key})
    with urllib.request.urlopen(request, timeout=5) as response:
        token = response.headers["X-Auth-Token"]
        storage = response.headers["X-Storage-Url"]
    for path, body in (("/testbed-probe", b""), ("/testbed-probe/probe", b"probe")):
        request = urllib.request.Request(storage + path, body, {"X-Auth-Token": token},
                                         method="PUT")
        urllib.request.urlopen(request, timeout=5).close()


def keystone_probe(url):
    keystone_token(url)


def keystone_swift_probe(url):
    """Succeeds when a Keystone token writes a container through the catalog's Swift."""
    import urllib.request
    token, body = keystone_token(url)
    storage = [e["url"] for s in body["catalog"] if s["type"] == "object-store"
               for e in s["endpoints"] if e["interface"] == "public"][0]
    request = urllib.request.Request(storage + "/testbed-probe", b"",
                                     {"X-Auth-Token": token}, method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


COMMANDS = {"rings": rings, "serve": serve, "logs": logs,
            "keystone-template": keystone_template, "keystone": keystone,
            "keystone-register": keystone_register, "keystone-probe": keystone_probe, "tempauth-probe": tempauth_probe,
            "keystone-swift-probe": keystone_swift_probe}


if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
