"""A site's startup kit: everything a hospital's IT needs to run its trainer, in one folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.common.signing import write_signing_key

ENV_FILE: Final = "site.env"
CA_FILE: Final = "ca.pem"
README: Final = "README.md"
COMPOSE_FILE: Final = "compose.yaml"
KIT_MOUNT: Final = "/etc/fedmq"
"""Where the container sees the kit; the env file's paths are relative to it."""
DEFAULT_IMAGE: Final = "fedmq:dev"


@dataclass(frozen=True)
class Kit:
    """What goes into one site's kit."""

    site: str
    task_id: str
    site_url: str
    """The broker URL with the site's own login."""
    signing_key: bytes
    public_line: str
    data_folder: Path
    """The hospital's images (`<class>/<image>` folders), same path on the host and inside."""
    ca_file: Path | None = None
    image: str = DEFAULT_IMAGE

    @property
    def key_name(self) -> str:
        """File name of the private signing key."""
        return f"{self.site}.key"

    def env_lines(self) -> list[str]:
        """The trainer's whole configuration; paths are relative to the kit folder."""
        lines = [
            f"FEDMQ_AMQP_URL={self.site_url}",
            f"FEDMQ_TASK_ID={self.task_id}",
            f"FEDMQ_TRAINER_ID={self.site}",
            f"FEDMQ_SIGNING_KEY_FILE={self.key_name}",
            f"FEDMQ_DATA_SOURCE=folder:{self.data_folder}",
        ]
        if self.ca_file is not None:
            lines.append(f"FEDMQ_CA_FILE={CA_FILE}")
        return lines

    def docker_run(self, kit_dir: Path) -> str:
        """A ready `docker run` line (the kit and the images mounted read-only)."""
        return (
            f"docker run -d --name fedmq-{self.site} --restart unless-stopped "
            f"--env-file {kit_dir / ENV_FILE} -v {kit_dir}:{KIT_MOUNT}:ro -w {KIT_MOUNT} "
            f"-v {self.data_folder}:{self.data_folder}:ro {self.image} trainer"
        )

    def compose(self) -> str:
        """A compose file to run from inside the kit folder (`docker compose up -d`)."""
        return (
            "services:\n"
            f"  trainer:\n"
            f"    image: {self.image}\n"
            '    command: ["trainer"]\n'
            "    restart: unless-stopped\n"
            f"    env_file: {ENV_FILE}\n"
            f"    working_dir: {KIT_MOUNT}\n"
            "    volumes:\n"
            f"      - .:{KIT_MOUNT}:ro\n"
            f"      - {self.data_folder}:{self.data_folder}:ro\n"
        )


def write_kit(kit: Kit, out: Path) -> Path:
    """Write the kit folder `out`; the private key is readable by its owner only."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    write_signing_key(out / kit.key_name, kit.signing_key)
    (out / f"{kit.site}.pub").write_text(kit.public_line + "\n")
    if kit.ca_file is not None:
        shutil.copyfile(kit.ca_file, out / CA_FILE)
    env = out / ENV_FILE
    env.write_text("\n".join(kit.env_lines()) + "\n")
    env.chmod(0o600)  # it holds the site's broker password
    (out / COMPOSE_FILE).write_text(kit.compose())
    (out / README).write_text(_readme(kit, out.resolve()))
    return out


def _readme(kit: Kit, kit_dir: Path) -> str:
    return f"""# fedmq startup kit of site {kit.site} (task {kit.task_id})

Keep this folder private: `{ENV_FILE}` holds the site's broker password and `{kit.key_name}`
the key that signs its updates. The aggregator already knows `{kit.site}.pub`.

Put the images under `{kit.data_folder}/<class name>/` (one folder per label, the names the
other sites use), then start the trainer in one of three ways:

    {kit.docker_run(kit_dir)}

    docker compose -f {kit_dir / COMPOSE_FILE} up -d

    cd {kit_dir} && set -a && . ./{ENV_FILE} && set +a && fedmq trainer

The trainer joins the task, trains on its images and sends signed updates. It stops cleanly
on `docker stop` (SIGTERM). Logs: `docker logs fedmq-{kit.site}`.
"""
