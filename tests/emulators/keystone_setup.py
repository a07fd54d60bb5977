"""Create the test identities in a freshly bootstrapped Keystone, over its v3 API.

Usage: keystone_setup.py KEYSTONE_V3_URL GLANCE_URL
Passwords come from the environment: KEYSTONE_ADMIN_PASSWORD (the one given to
`keystone-manage bootstrap`), GLANCE_SERVICE_PASSWORD, CI_PASSWORD.

Creates, in domain Default (id "default"):
  projects  service, demo
  user      glance  (admin and service roles on project service: Glance's
                     keystonemiddleware validates users' tokens with it)
  user      ci      (member role on project demo: what the tests log in as)
  service   image   with public/internal/admin endpoints at GLANCE_URL, RegionOne
Re-running it finds what exists instead of failing. Standard library only, so it
runs under any of the emulator venvs' pythons.
"""

import json
import os
import sys
import urllib.error
import urllib.request

DOMAIN_ID = "default"
REGION = "RegionOne"


# Talk to 127.0.0.1 directly even when an http(s)_proxy is set in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Keystone:
    def __init__(self, url):
        self.url = url.rstrip("/")
        self.token = None

    def call(self, method, path, body=None, ok=(200, 201, 204)):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("X-Auth-Token", self.token)
        try:
            with _OPENER.open(req, timeout=30) as resp:
                status, headers, raw = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            status, headers, raw = err.code, err.headers, err.read()
        if status not in ok:
            raise SystemExit(
                f"keystone_setup: {method} {path} -> HTTP {status}: "
                f"{raw.decode(errors='replace')[:500]}"
            )
        return status, headers, (json.loads(raw) if raw else {})

    def login_admin(self, password):
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": "admin",
                            "domain": {"id": DOMAIN_ID},
                            "password": password,
                        }
                    },
                },
                "scope": {"project": {"name": "admin", "domain": {"id": DOMAIN_ID}}},
            }
        }
        _, headers, _ = self.call("POST", "/auth/tokens", body, ok=(201,))
        self.token = headers["X-Subject-Token"]

    def find(self, collection, key, **filters):
        query = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in filters.items())
        _, _, body = self.call("GET", f"/{collection}?{query}")
        return body[key]

    def ensure(self, collection, key, filters, create):
        """Return the one entity matching filters, creating it if there is none."""
        found = self.find(collection, collection, **filters)
        if found:
            return found[0]
        _, _, body = self.call("POST", f"/{collection}", {key: create}, ok=(201,))
        return body[key]

    def role_id(self, name):
        roles = self.find("roles", "roles", name=name)
        if not roles:
            raise SystemExit(f"keystone_setup: role {name!r} is missing")
        return roles[0]["id"]

    def grant(self, project_id, user_id, role_name):
        role_id = self.role_id(role_name)
        self.call(
            "PUT", f"/projects/{project_id}/users/{user_id}/roles/{role_id}", ok=(204,)
        )


def main():
    keystone_url, glance_url = sys.argv[1], sys.argv[2].rstrip("/")
    ks = Keystone(keystone_url)
    ks.login_admin(os.environ["KEYSTONE_ADMIN_PASSWORD"])

    projects = {}
    for name, description in (
        ("service", "OpenStack services"),
        ("demo", "conductor tests"),
    ):
        projects[name] = ks.ensure(
            "projects",
            "project",
            {"name": name, "domain_id": DOMAIN_ID},
            {"name": name, "domain_id": DOMAIN_ID, "description": description},
        )

    users = {
        "glance": (os.environ["GLANCE_SERVICE_PASSWORD"], "service", ("admin", "service")),
        "ci": (os.environ["CI_PASSWORD"], "demo", ("member",)),
    }
    for name, (password, project, roles) in users.items():
        user = ks.ensure(
            "users",
            "user",
            {"name": name, "domain_id": DOMAIN_ID},
            {
                "name": name,
                "domain_id": DOMAIN_ID,
                "password": password,
                "default_project_id": projects[project]["id"],
                "enabled": True,
            },
        )
        for role in roles:
            ks.grant(projects[project]["id"], user["id"], role)

    service = ks.ensure(
        "services",
        "service",
        {"type": "image"},
        {"type": "image", "name": "glance", "description": "Image service", "enabled": True},
    )
    for interface in ("public", "internal", "admin"):
        ks.ensure(
            "endpoints",
            "endpoint",
            {"service_id": service["id"], "interface": interface},
            {
                "service_id": service["id"],
                "interface": interface,
                "url": glance_url,
                "region_id": REGION,
                "enabled": True,
            },
        )


if __name__ == "__main__":
    main()
