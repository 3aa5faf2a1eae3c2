import pytest

from tests.deploy.helpers import sh
from tests.integration import conftest as integration

#: the local broker of deploy/kafka, as the integration tests use it (the chart's pods run against it)
kafka_broker = integration.kafka_broker


@pytest.fixture(scope="session")
def images() -> None:
    """tagstream's, Kafka's and Prometheus's images, built here from the checkout."""
    sh("deploy/container/build.sh", "all", timeout=1800)
