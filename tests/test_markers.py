"""The ``ray`` marker is true: ``make test-fast`` (``-m "not ray and not slow"``) starts no Ray cluster.

``tests/conftest.py`` marks ``ray`` every test using a Ray fixture and fails a test not marked
``ray`` that leaves Ray running in this process. A test that starts Ray only in a child
process (a real ``instalign`` verb) is marked by hand.
"""

from __future__ import annotations

from tests.conftest import RAY_FIXTURES


def test_every_selected_test_using_a_ray_fixture_is_marked_ray(request):
    unmarked = [item.nodeid for item in request.session.items
                if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("ray") is None]
    assert unmarked == [], "use a Ray fixture but are not marked ray:\n  " + "\n  ".join(unmarked)


def test_tests_that_replace_the_shared_cluster_run_after_its_users(request):
    """Each ``own_cluster`` test shuts the session's cluster down; a ``ray_local`` user after it
    would start that cluster again, so they all come last."""
    from tests.conftest import _owns_the_cluster

    owners = [i for i, item in enumerate(request.session.items) if _owns_the_cluster(item)]
    users = [i for i, item in enumerate(request.session.items)
             if not _owns_the_cluster(item) and RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    assert not owners or not users or max(users) < min(owners), \
        [request.session.items[i].nodeid for i in owners if i < max(users)]
