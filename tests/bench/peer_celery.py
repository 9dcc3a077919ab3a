"""The peer: a Flask + Celery app sending mail the way the typical one does.

This is Flask's own "Background Tasks with Celery" pattern (``celery_init_app`` with a task class
that pushes the app context) and the mail task most such apps carry: the message travels in the
task's arguments, and each task opens an SMTP connection, logs in, sends and quits — what
Flask-Mail's ``mail.send`` and hand-written ``smtplib`` code both do per call. There is no result
backend (``ignore_result``), and Redis is the broker.

Configured from the environment so the benchmark can point it at its own Redis and sink:
``BENCH_CELERY_BROKER``, ``MAIL_SERVER``, ``MAIL_PORT``, ``MAIL_USERNAME``, ``MAIL_PASSWORD``,
``MAIL_DEFAULT_SENDER``. Run the worker with ``celery -A tests.bench.peer_celery worker``.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage
from email.utils import formatdate

from celery import Celery, Task, shared_task
from flask import Flask, current_app


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY={
            "broker_url": os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/1"),
            "task_ignore_result": True,
            "broker_connection_retry_on_startup": True,
        },
        MAIL_SERVER=os.environ.get("MAIL_SERVER", "127.0.0.1"),
        MAIL_PORT=int(os.environ.get("MAIL_PORT", "1025")),
        MAIL_USERNAME=os.environ.get("MAIL_USERNAME", ""),
        MAIL_PASSWORD=os.environ.get("MAIL_PASSWORD", ""),
        MAIL_DEFAULT_SENDER=os.environ.get("MAIL_DEFAULT_SENDER", "noreply@example.com"),
    )
    celery_init_app(app)
    return app


@shared_task(ignore_result=True, autoretry_for=(smtplib.SMTPException, OSError), retry_backoff=True)
def send_mail(recipient: str, subject: str, body: str, message_id: str) -> None:
    config = current_app.config
    message = EmailMessage()
    message["From"] = config["MAIL_DEFAULT_SENDER"]
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = formatdate()
    message["Message-ID"] = message_id
    message.set_content(body)
    with smtplib.SMTP(config["MAIL_SERVER"], config["MAIL_PORT"], timeout=30) as smtp:
        if config["MAIL_USERNAME"]:
            smtp.login(config["MAIL_USERNAME"], config["MAIL_PASSWORD"])
        smtp.send_message(message)


flask_app = create_app()
celery_app = flask_app.extensions["celery"]
app = celery_app  # what `celery -A tests.bench.peer_celery` looks for
