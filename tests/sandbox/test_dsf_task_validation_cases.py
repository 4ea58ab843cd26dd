"""Cases of DSF's integration tests whose verdict comes from profile validation, not from the
authorization rules: DSF validates every created or updated resource against its profiles and
answers 403 when it is invalid (``forbiddenNotValid``). They pass only with the sandbox's
validator (``dsf_bridge.sandbox.validation``, attached by ``build_service``).
"""

from __future__ import annotations

import pytest

from dsf_bridge.dsf.versions import DsfRelease
from tests.sandbox.test_dsf_fixtures import LOCAL, RELEASES, DsfIntegration, assert_forbidden
from tests.sandbox.test_dsf_questionnaire_response_integration import questionnaire_response


@pytest.mark.parametrize("release", RELEASES)
def test_create_not_allowed_by_local_user_questionnaire_does_not_exists(
    release: DsfRelease,
) -> None:
    """QuestionnaireResponseIntegrationTest.testCreateNotAllowedByLocalUserQuestionnaireDoesNotExists:
    valid by the rules, but its Questionnaire is not on the server."""
    dsf = DsfIntegration.start(release)
    assert_forbidden(dsf.create(LOCAL, questionnaire_response(dsf)), "create")
    assert dsf.service.store.all("QuestionnaireResponse") == []
