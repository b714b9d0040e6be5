"""The ``serving`` driver: the search service's request validation, components and the one
orchestration (used in-process by ``SearchService`` and by the Ray Serve app in serve/),
and the load test of a running server."""
from cir_bench.serving.components import EncoderStage, IndexStage, ItemImages, ServeBundle, StudentStage, \
    TeacherStage, build_bundle
from cir_bench.serving.requests import Catalog, RequestError, RequestParser, SearchRequest, ServiceLimits, \
    example_requests, json_body, request_from_query, text_field
from cir_bench.serving.service import SearchService

__all__ = ["Catalog", "EncoderStage", "IndexStage", "ItemImages", "RequestError", "RequestParser", "SearchRequest",
           "SearchService", "ServeBundle", "ServiceLimits", "StudentStage", "TeacherStage", "build_bundle",
           "example_requests", "json_body", "request_from_query", "text_field"]
