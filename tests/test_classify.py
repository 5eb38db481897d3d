from batchops.classify import (
    classify_batch_error,
    classify_http,
    classify_line_error,
)
from batchops.masking import mask_key


def test_quota_is_decided_by_code_not_status():
    assert classify_http(429, "insufficient_quota", "insufficient_quota") == "quota"
    assert classify_http(429, "rate_limit_exceeded", "tokens") == "rate_limit"
    assert classify_http(429, None) == "rate_limit"


def test_model_and_key_errors_exhaust():
    assert classify_http(404, "model_not_found") == "model_not_found"
    assert classify_http(403, "model_not_found") == "model_not_found"
    assert classify_http(401, "invalid_api_key") == "auth"


def test_server_errors_and_bad_requests():
    assert classify_http(500, "server_error") == "api_error"
    assert classify_http(503, None) == "api_error"
    assert classify_http(None, None) == "api_error"
    assert classify_http(400, None, "invalid_request_error") == "invalid_request"


def test_line_and_batch_errors():
    assert classify_line_error("batch_expired") == "expired"
    assert classify_line_error("batch_cancelled") == "cancelled"
    assert classify_line_error("request_timeout") == "timeout"
    assert classify_batch_error("token_limit_exceeded") == "token_limit"
    assert classify_batch_error("model_not_found") == "model_not_found"
    assert classify_batch_error("invalid_json_line") == "api_error"


def test_mask_key_never_shows_the_middle():
    key = "sk-proj-fake-abcdefghij-klmnopqrs-3456"  # not key-shaped: the secret scan stays quiet
    masked = mask_key(key)
    assert masked == "sk-…3456"
    assert "abcdefgh" not in masked
