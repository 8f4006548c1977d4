#!/usr/bin/env python3
"""Tests of .ci/check_links.py: it passes a known-good fixture and names every
broken link of a known-bad one (.ci/fixtures/links/{good,bad}/).

    python3 .ci/test_check_links.py     # what .ci/run runs
"""

import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import check_links  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures", "links")
FILES = ["README.md", "docs/page.md", "alerts.yaml"]


def run(fixture):
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "check_links.py")] + FILES,
        cwd=os.path.join(FIXTURES, fixture),
        capture_output=True,
        text=True,
    )


class Slug(unittest.TestCase):
    def test_github_rules(self):
        cases = {
            "Quick start": "quick-start",
            "A heading with `code`, and punctuation!": "a-heading-with-code-and-punctuation",
            "The template fix (Istio 1.5 - 1.7)": "the-template-fix-istio-15---17",
            "Native admission policy (Kubernetes 1.36+)": "native-admission-policy-kubernetes-136",
            "Is canary routing sound here? `canary-injector check`": "is-canary-routing-sound-here-canary-injector-check",
            "Offline: `canary-injector routes -f`": "offline-canary-injector-routes--f",
            "snake_case stays": "snake_case-stays",
            "A [linked](other.md) word": "a-linked-word",
        }
        for heading, expected in cases.items():
            self.assertEqual(check_links.slug(heading), expected, heading)


class Fixtures(unittest.TestCase):
    def test_good_fixture_passes(self):
        result = run("good")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(result.stdout, "links: 3 file(s), every relative link and anchor resolves\n")

    def test_bad_fixture_fails_naming_every_broken_link(self):
        result = run("bad")
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(
            result.stdout.splitlines(),
            [
                "README.md:3: docs/missing.md: no such file: docs/missing.md",
                "README.md:3: docs/page.md#no-such-heading: no heading or anchor #no-such-heading in docs/page.md",
                "README.md:4: #nowhere: no heading or anchor #nowhere in README.md",
                "README.md:5: docs/page.md#A-Heading: no heading or anchor #A-Heading in docs/page.md",
                "README.md:6: docs/page.md#fenced: no heading or anchor #fenced in docs/page.md",
                "alerts.yaml:1: https://github.com/canary-injector/canary-injector/blob/main/README.md"
                "#no-such-section: no heading or anchor #no-such-section in README.md",
            ],
        )
        self.assertIn("6 broken link(s)", result.stderr)

    def test_a_file_that_does_not_exist_is_bad_usage(self):
        result = subprocess.run(
            [sys.executable, os.path.join(HERE, "check_links.py"), "no-such-file.md"],
            cwd=FIXTURES,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 2)


if __name__ == "__main__":
    unittest.main()
