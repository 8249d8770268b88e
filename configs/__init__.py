"""The training configurations, installed as the package data of longnet.configs so that an
installed trainer finds them by name: `longnet-train --config tiny-cpu`."""
