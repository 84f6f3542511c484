# The app image the kind tests run as Machines: kubefly's own test app
# (kubefly.proxy.testapp: reports its machine id, /slow, /crash, /full),
# on the kubefly image so it shares its layers.
ARG KUBEFLY_IMAGE=kubefly:latest
FROM ${KUBEFLY_IMAGE}
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["/opt/kubefly/bin/python", "-m", "kubefly.proxy.testapp"]
