"""meterline.config: YAML + env loading, and start-up failures that name the field."""

from __future__ import annotations

import os
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.config import ConfigError, MeterConfig, Settings, load_settings

BASE_YAML = """
database_url: postgresql://meter@db.example:5432/meterline
kafka:
  bootstrap_servers: kafka-1:9092
  usage_topic: usage.events
processor:
  window_size_ms: 5000
  window_grace_ms: 1000
  thresholds_percent: [100, 50, 75, 50]
meters:
  - key: api_calls
    event_type: api_request
    aggregation: count
    credits_per_unit: "0.001"
  - key: llm_tokens
    event_type: llm_tokens
    aggregation: sum
    value_property: tokens
    credits_per_unit: "0.00002"
plans:
  - key: starter
    included_credits: "50"
customers:
  - id: cus_1
    plan: starter
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No METERLINE_*, DATABASE_URL or KAFKA_BOOTSTRAP_SERVERS from the outer environment."""
    for name in list(os.environ):
        if name.startswith("METERLINE_") or name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meterline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return str(info.value)


# --- loading -------------------------------------------------------------------------------------


def test_load_settings_reads_the_yaml_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE_YAML))

    assert settings.database_url == "postgresql://meter@db.example:5432/meterline"
    assert settings.kafka.bootstrap_servers == "kafka-1:9092"
    assert settings.kafka.partitions == 4  # default kept for keys the file leaves out
    assert settings.processor.window_size_ms == 5000
    assert [m.key for m in settings.meters] == ["api_calls", "llm_tokens"]
    assert settings.meters[1].credits_per_unit == Decimal("0.00002")  # exact, not a float
    assert settings.customers[0].plan == "starter"


def test_thresholds_are_sorted_and_deduplicated(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, BASE_YAML)).processor.thresholds_percent == (50, 75, 100)


def test_meter_for_type_maps_cloudevents_types_to_meters(tmp_path: Path) -> None:
    meters = load_settings(write(tmp_path, BASE_YAML)).meter_for_type()

    assert {t: m.key for t, m in meters.items()} == {"api_request": "api_calls", "llm_tokens": "llm_tokens"}


def test_without_a_file_the_defaults_apply() -> None:
    settings = load_settings()

    assert settings == Settings()
    assert settings.processor.window_size_ms == 5_000


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == Settings()


def test_meterline_config_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_CONFIG", str(write(tmp_path, BASE_YAML)))

    assert load_settings().kafka.bootstrap_servers == "kafka-1:9092"


def test_keyword_overrides_win_over_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE_YAML), processor={"window_grace_ms": 0})

    assert settings.processor.window_grace_ms == 0
    assert settings.processor.window_size_ms == 5000  # merged, not replaced


# --- env overrides ---------------------------------------------------------------------------


def test_env_var_overrides_a_nested_yaml_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_PROCESSOR__WINDOW_SIZE_MS", "10000")

    settings = load_settings(write(tmp_path, BASE_YAML))

    assert settings.processor.window_size_ms == 10_000
    assert settings.processor.window_grace_ms == 1000  # siblings from the file survive


def test_env_var_overrides_a_default_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_RELAY__BATCH_SIZE", "42")

    assert load_settings().relay.batch_size == 42


def test_database_url_env_var_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://other@pg:5432/x")

    assert load_settings(write(tmp_path, BASE_YAML)).database_url == "postgresql://other@pg:5432/x"


def test_kafka_bootstrap_env_var_overrides_only_the_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:19092")

    kafka = load_settings(write(tmp_path, BASE_YAML)).kafka

    assert kafka.bootstrap_servers == "broker:19092"
    assert kafka.usage_topic == "usage.events"


def test_meterline_env_var_wins_over_the_well_known_connection_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "generic:9092")
    monkeypatch.setenv("METERLINE_KAFKA__BOOTSTRAP_SERVERS", "specific:9092")

    assert load_settings().kafka.bootstrap_servers == "specific:9092"


# --- failures name the field -----------------------------------------------------------------


def test_bad_value_raises_config_error_naming_the_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, "processor:\n  window_size_ms: 50\n")  # minimum is 100

    assert "processor.window_size_ms" in message


def test_bad_env_value_raises_config_error_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERLINE_PROCESSOR__WINDOW_SIZE_MS", "five seconds")

    with pytest.raises(ConfigError, match=r"processor\.window_size_ms"):
        load_settings(write(tmp_path, BASE_YAML))


def test_bad_field_inside_a_list_is_named_with_its_index(tmp_path: Path) -> None:
    message = config_error(tmp_path, """
        meters:
          - key: api_calls
            event_type: api_request
            aggregation: count
            credits_per_unit: "-1"
        """)

    assert "meters.0.credits_per_unit" in message


def test_unknown_key_is_rejected_and_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, "processor:\n  window_size: 5000\n")  # typo for window_size_ms

    assert "processor.window_size" in message


def test_threshold_out_of_range_is_rejected(tmp_path: Path) -> None:
    message = config_error(tmp_path, "processor:\n  thresholds_percent: [50, 120]\n")

    assert "processor.thresholds_percent" in message


def test_customer_with_unknown_plan_fails(tmp_path: Path) -> None:
    message = config_error(tmp_path, """
        plans:
          - key: starter
            included_credits: "50"
        customers:
          - id: cus_1
            plan: enterprise
        """)

    assert "unknown plan 'enterprise'" in message
    assert "cus_1" in message


def test_duplicate_meter_keys_fail(tmp_path: Path) -> None:
    message = config_error(tmp_path, """
        meters:
          - key: api_calls
            event_type: api_request
            aggregation: count
            credits_per_unit: "0.001"
          - key: api_calls
            event_type: api_request_v2
            aggregation: count
            credits_per_unit: "0.002"
        """)

    assert "duplicate meter key" in message


def test_two_meters_for_one_event_type_fail(tmp_path: Path) -> None:
    message = config_error(tmp_path, """
        meters:
          - {key: a, event_type: same, aggregation: count, credits_per_unit: "1"}
          - {key: b, event_type: same, aggregation: count, credits_per_unit: "1"}
        """)

    assert "event_type" in message


@pytest.mark.parametrize("aggregation", ["sum", "max", "latest"])
def test_value_aggregation_without_value_property_fails(tmp_path: Path, aggregation: str) -> None:
    message = config_error(tmp_path, f"""
        meters:
          - key: gpu_seconds
            event_type: gpu_usage
            aggregation: {aggregation}
            credits_per_unit: "0.01"
        """)

    assert "value_property" in message
    assert "gpu_seconds" in message


def test_count_meter_needs_no_value_property() -> None:
    meter = MeterConfig(key="api_calls", event_type="api_request", aggregation="count",
                        credits_per_unit=Decimal("0.001"))

    assert meter.value_property is None


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(write(tmp_path, "processor: [unclosed\n"))


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "top level must be a mapping" in config_error(tmp_path, "- just\n- a list\n")
