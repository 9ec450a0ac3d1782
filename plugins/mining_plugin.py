"""Airflow plugin: the Mining view (accepted images, rejections, models, weekly report).

Airflow 3 serves plugin web apps from the API server: ``fastapi_apps`` mounts the app at
/mining, and ``external_views`` adds a "Mining" entry to the navigation that shows it
inside the UI (an iframe under /plugin/mining). The page reads the warehouse read-only.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from mining_view import create_app

URL_PREFIX = "/mining"


class MiningPlugin(AirflowPlugin):
    name = "mining"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Mining"}]  # noqa: RUF012
    external_views = [{  # noqa: RUF012
        "name": "Mining",
        "href": f"{URL_PREFIX}/",
        "url_route": "mining",
        "destination": "nav",
        "category": "browse",
    }]
