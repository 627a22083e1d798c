"""The images scripts/build-images.sh writes agree with docker/*.Dockerfile (the release
path) and run: entrypoint, user and exposed ports as the Dockerfile's final stage says,
the binary where the entrypoint names it, every library it needs in the image.

The Dockerfiles are read here independently of the script (their final stage's USER,
EXPOSE, ENTRYPOINT), and each image is unpacked and its entrypoint executed in a chroot
of its own filesystem as its user: a missing library or a wrong path fails.
"""
import json
import os
import shlex
import subprocess
import tarfile
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = os.environ.get("KACHE_IMAGES_DIR", os.path.join(ROOT, "target", "images"))


def dockerfile_runtime(name):
    """USER, EXPOSE ports and ENTRYPOINT of the Dockerfile's last stage."""
    text = open(os.path.join(ROOT, "docker", f"{name}.Dockerfile")).read().replace("\\\n", " ")
    stage = text.split("\nFROM ")[-1]
    user, ports, entrypoint = None, [], None
    for line in stage.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "USER":
            user = rest.strip()
        elif word == "EXPOSE":
            ports += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
    return user, sorted(ports), entrypoint


def image(name):
    path = os.path.join(IMAGES, f"{name}.tar")
    if not os.path.exists(path):
        pytest.fail(f"{path} missing: run scripts/build-images.sh")
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config = json.load(t.extractfile(manifest["Config"]))
        layers = [t.extractfile(layer).read() for layer in manifest["Layers"]]
    return manifest, config, layers


@pytest.mark.parametrize("name,ports", [
    ("kache-node", ["11211/tcp", "11212/tcp", "11280/tcp"]),
    ("kache-operator", ["8080/tcp"]),
])
def test_image_config_matches_the_dockerfile(name, ports):
    user, exposed, entrypoint = dockerfile_runtime(name)
    assert exposed == ports, f"docker/{name}.Dockerfile EXPOSE changed: {exposed}"
    manifest, config, _ = image(name)
    version = open(os.path.join(ROOT, "Cargo.toml")).read().split('version = "')[1].split('"')[0]
    assert manifest["RepoTags"] == [f"ghcr.io/kache-dev/{name}:{version}"]
    c = config["config"]
    assert c["User"] == user == "65532:65532"
    assert c["Entrypoint"] == entrypoint == [f"/usr/local/bin/{name}"]
    assert sorted(c["ExposedPorts"]) == exposed
    assert c["Labels"]["org.opencontainers.image.title"] == name
    assert config["os"] == "linux" and config["architecture"] == "amd64"


@pytest.mark.parametrize("name", ["kache-node", "kache-operator"])
def test_image_runs_its_entrypoint_as_its_user(name):
    _, config, layers = image(name)
    with tempfile.TemporaryDirectory(prefix=f"kache-image-{name}-") as root:
        for data in layers:
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                with tarfile.open(f.name) as t:
                    t.extractall(root)  # our own image: trusted
        entry = config["config"]["Entrypoint"]
        binary = os.path.join(root, entry[0].lstrip("/"))
        assert os.access(binary, os.X_OK), f"{entry[0]} not executable in the image"
        passwd = open(os.path.join(root, "etc/passwd")).read()
        assert "nonroot:x:65532:65532:" in passwd
        assert os.path.isfile(os.path.join(root, "etc/ssl/certs/ca-certificates.crt"))
        assert oct(os.stat(os.path.join(root, "tmp")).st_mode & 0o7777) == "0o1777"
        assert not os.path.exists(os.path.join(root, "bin/sh")), "no shell, like distroless"
        # Nothing but what is in the image: a missing library fails here.
        out = subprocess.run(["chroot", "--userspec", config["config"]["User"], root,
                              *entry, "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{shlex.join(entry)} --version in the image: {out.stderr}"
        assert name in out.stdout, out.stdout
