"""The block-device side of EBS for the testbed: a test double of EC2's hypervisor.

moto_server answers the EC2 API (volumes, snapshots, attachments) but no block device
ever appears on this host. This proxy sits between Phoenix and moto, passes every
request through unchanged, and does what the hypervisor would do once moto said yes:

  CreateVolume    a sparse image of the volume's size, or a reflink copy of the image of
                  the snapshot it is made from
  CreateSnapshot  a reflink copy of the volume's image, taken before the answer goes back
                  (a reflink clone on btrfs is atomic: the copy is crash-consistent, as an
                  EBS snapshot is)
  AttachVolume    a loop device on the image, linked where a Nitro host shows an EBS
                  volume: <devices>/nvme-Amazon_Elastic_Block_Store_vol<hex>; a volume
                  attached already is refused (VolumeInUse), as EC2 does and moto does not
  DetachVolume    the link and the loop device removed; a volume still mounted is refused
                  (EC2 would detach it, losing the file system's writes)
  DeleteVolume,   the image removed
  DeleteSnapshot

Images live on a btrfs directory (for reflinks). Needs root (losetup).

usage: ec2_hypervisor.py PORT MOTO_URL IMAGES_DIR DEVICES_DIR
"""

import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, MOTO, IMAGES, DEVICES = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3], sys.argv[4]
ID = re.compile(r"^(vol|snap)-[0-9a-f]{1,32}$")
GIB = 1 << 30
# One change of images or loop devices at a time: the broker may attach two volumes at once.
lock = threading.Lock()


def image(resource_id):
    if not ID.match(resource_id):
        raise ValueError(f"not an EBS id: {resource_id!r}")
    return os.path.join(IMAGES, resource_id + ".img")


def device_link(volume_id):
    return os.path.join(DEVICES, "nvme-Amazon_Elastic_Block_Store_" + volume_id.replace("-", ""))


def first(tag, body):
    found = re.search(rf"<{tag}>([^<]+)</{tag}>", body)
    return found.group(1) if found else None


def log(message):
    print(message, file=sys.stderr, flush=True)


def create_volume(params, body):
    volume = first("volumeId", body)
    snapshot = params.get("SnapshotId")
    if snapshot and os.path.exists(image(snapshot)):
        subprocess.run(["cp", "--reflink=always", image(snapshot), image(volume)], check=True)
    else:
        size = int(params.get("Size") or first("size", body) or 1)
        with open(image(volume), "wb") as f:
            f.truncate(size * GIB)
    log(f"CreateVolume {volume} from {snapshot or 'nothing'}")


def create_snapshot(params, body):
    snapshot, volume = first("snapshotId", body), params["VolumeId"]
    if os.path.exists(image(volume)):
        subprocess.run(["cp", "--reflink=always", image(volume), image(snapshot)], check=True)
    log(f"CreateSnapshot {snapshot} of {volume}")


def attach_volume(params, _body):
    volume = params["VolumeId"]
    loop = subprocess.run(
        ["losetup", "--find", "--show", image(volume)], check=True, capture_output=True, text=True
    ).stdout.strip()
    link = device_link(volume)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(loop, link)
    log(f"AttachVolume {volume} as {loop}")


def mounted(params):
    """Whether the volume's loop device is mounted: detaching it would lose writes."""
    link = device_link(params.get("VolumeId", ""))
    if not os.path.lexists(link):
        return False
    found = subprocess.run(["findmnt", "-rn", "-S", os.readlink(link)], capture_output=True)
    return found.returncode == 0


def detach_volume(params, _body):
    volume = params["VolumeId"]
    link = device_link(volume)
    if os.path.lexists(link):
        loop = os.readlink(link)
        os.unlink(link)
        subprocess.run(["losetup", "--detach", loop], check=True)
        log(f"DetachVolume {volume} from {loop}")


def delete_resource(key):
    def delete(params, _body):
        path = image(params[key])
        if os.path.exists(path):
            os.unlink(path)
        log(f"Deleted {params[key]}")

    return delete


EFFECTS = {
    "CreateVolume": create_volume,
    "CreateSnapshot": create_snapshot,
    "AttachVolume": attach_volume,
    "DetachVolume": detach_volume,
    "DeleteVolume": delete_resource("VolumeId"),
    "DeleteSnapshot": delete_resource("SnapshotId"),
}


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        request_body = self.rfile.read(length)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(request_body.decode()).items()}
        params.update({k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).items()})
        if params.get("Action") == "DetachVolume" and mounted(params):
            # EC2 would detach it and the file system would lose its writes: a test fails.
            return self.answer(400, {"Content-Type": "text/xml"}, b"<Response><Errors><Error>"
                               b"<Code>TestbedVolumeMounted</Code><Message>the volume is mounted"
                               b"</Message></Error></Errors><RequestID>testbed</RequestID></Response>")
        if params.get("Action") == "AttachVolume" and os.path.lexists(device_link(params.get("VolumeId", ""))):
            # EC2 refuses a second attachment; moto does not.
            return self.answer(400, {"Content-Type": "text/xml"}, b"<Response><Errors><Error><Code>VolumeInUse</Code><Message>"
                               + params["VolumeId"].encode() + b" is already attached to an instance"
                               b"</Message></Error></Errors><RequestID>testbed</RequestID></Response>")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        request = urllib.request.Request(
            MOTO + self.path, data=request_body or None, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(request) as answer:
                status, answer_headers, body = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as refused:
            status, answer_headers, body = refused.code, refused.headers, refused.read()
        effect = EFFECTS.get(params.get("Action"))
        if effect and status == 200:
            try:
                with lock:
                    effect(params, body.decode())
            except Exception as failed:  # the hypervisor failed: so does the call
                log(f"{params.get('Action')} failed on the host: {failed}")
                status, body = 500, b"<Response><Errors><Error><Code>InternalError</Code>" \
                    b"<Message>the testbed hypervisor failed</Message></Error></Errors></Response>"
        self.answer(status, answer_headers, body)

    def answer(self, status, answer_headers, body):
        self.send_response(status)
        for key, value in answer_headers.items():
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = forward

    def log_message(self, *_args):
        pass


os.makedirs(IMAGES, exist_ok=True)
os.makedirs(DEVICES, exist_ok=True)
ThreadingHTTPServer(("127.0.0.1", int(PORT)), Proxy).serve_forever()
