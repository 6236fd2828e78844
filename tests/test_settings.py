"""Process settings from the environment: the database password and its redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from reaper.settings import Settings, redact_url


class TestDatabasePassword:
    def test_password_file_is_applied(self, tmp_path: Path) -> None:
        """REAPER_DATABASE_PASSWORD_FILE puts the file's content (trimmed) in the URL."""
        (tmp_path / "pw").write_text("s3cret-pw\n")
        settings = Settings(
            database_url="postgresql://reaper@db/reaper", database_password_file=tmp_path / "pw"
        )
        assert settings.database().password == "s3cret-pw"
        assert "s3cret-pw" not in redact_url(settings.database())

    def test_an_empty_file_means_no_password(self, tmp_path: Path) -> None:
        """An empty credential (systemd units ship one for SQLite) sets no password."""
        (tmp_path / "pw").write_text("\n")
        settings = Settings(
            database_url="postgresql://reaper@db/reaper", database_password_file=tmp_path / "pw"
        )
        assert settings.database().password is None

    def test_relative_file_is_a_systemd_credential(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative password file is read from $CREDENTIALS_DIRECTORY (LoadCredential=)."""
        (tmp_path / "db-password").write_text("from-credentials")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
        settings = Settings(
            database_url="postgresql://reaper@db/reaper", database_password_file=Path("db-password")
        )
        assert settings.database().password == "from-credentials"

    def test_environment_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """REAPER_DATABASE_PASSWORD works too and is kept secret in repr."""
        monkeypatch.setenv("REAPER_DATABASE_PASSWORD", "env-secret")
        monkeypatch.setenv("REAPER_DATABASE_URL", "postgresql://reaper@db/reaper")
        settings = Settings()
        assert settings.database().password == "env-secret"
        assert "env-secret" not in repr(settings)

    def test_plain_postgresql_urls_use_psycopg(self) -> None:
        """postgresql:// is driven by psycopg 3."""
        settings = Settings(database_url="postgresql://reaper@db/reaper")
        assert settings.database().drivername == "postgresql+psycopg"

    @pytest.mark.parametrize("url", ["mysql://x@y/z", "not a url"])
    def test_unsupported_urls(self, url: str) -> None:
        """Only SQLite and PostgreSQL audit databases are accepted."""
        with pytest.raises(ValueError, match="database"):
            Settings(database_url=url)
